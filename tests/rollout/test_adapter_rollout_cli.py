"""`moeserve rollout ... --adapter NAME`: the start call the CLI sends, checked before it
connects to anything, and the status it prints (no Ray)."""

import json

import pytest

from serve_app.cli.main import build_parser
from serve_app.rollout.state import AnalysisConfig, Strategy
from serve_app.tools.rollout_cli import _adapter_start_call, format_status
from tests.rollout.test_adapter_rollout import make


def parse(*argv):
    return build_parser().parse_args(["rollout", *argv])


def adapter_dir(tmp_path, name):
    d = tmp_path / name
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"r": 4}))
    return d


def test_start_names_the_adapter_the_new_directory_and_the_strategy(tmp_path):
    new = adapter_dir(tmp_path, "sql-v2")
    args = parse("start", "--adapter", "sql", str(new), "--steps", "10,100", "--interval", "5m")
    call = _adapter_start_call(args)
    assert call["adapter"] == "sql" and call["version"] == "sql-v2"  # the directory's name
    assert call["config"] == {"model": str(new)} and call["stable_path"] is None
    assert call["strategy"] == {"kind": "canary", "steps": [10, 100], "interval_s": 300.0,
                                "auto": True}  # fmt: skip
    AnalysisConfig(**call["analysis"])  # the controller builds it from this
    old = adapter_dir(tmp_path, "sql-v1")
    args = parse("start", "--adapter", "sql", str(new), "--version", "v2", "--from", str(old))
    call = _adapter_start_call(args)
    assert call["version"] == "v2" and call["stable_path"] == str(old)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["NOPE"], "not a PEFT adapter directory"),
        (["NEW", "--version", "a@b"], "without '@'"),
        (["NEW", "--steps", "10,50"], "the last step must be 100"),
    ],
)
def test_a_bad_start_is_refused_before_connecting(tmp_path, argv, message):
    new = str(adapter_dir(tmp_path, "new"))
    argv = [new if a == "NEW" else str(tmp_path / "nope") if a == "NOPE" else a for a in argv]
    with pytest.raises(ValueError, match=message):
        _adapter_start_call(parse("start", "--adapter", "sql", *argv))


def test_status_names_the_adapter_and_each_versions_engine_adapter():
    ctls, _, _ = make()
    gates = AnalysisConfig(min_samples=1)
    ctls.start("sql", "v2", {"model": "/a/sql-v2"}, Strategy("canary", (10, 100)), gates)
    text = format_status(ctls.status("sql"))
    assert text.startswith("adapter sql | phase progressing | canary step 1/2 (10%)")
    assert "sql@v2" in text and "sql@sql-v1" in text
    assert parse("status", "--adapter", "sql").adapter == "sql"
