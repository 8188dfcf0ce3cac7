"""`moeserve bench serve --repeat N`: each goal's ratio over rounds (pure summary), and a real
two-round run against a server in this process (what the command prints and writes)."""

from __future__ import annotations

import json
import re

import pytest

from serve_app.bench.serve_report import TargetRun
from serve_app.bench.serve_rounds import goal_rounds, rounds_json, write_rounds_plot
from tests.bench.test_serve_bench import target


def rounds_of(*pairs: tuple[float, float]) -> list[list[TargetRun]]:
    """One round per (inproc, ep0) tok/s pair at 32 streams."""
    return [[target("inproc", {32: a}), target("moeserve-ep0", {32: b})] for a, b in pairs]


def test_a_goal_is_judged_by_the_median_of_its_rounds() -> None:
    goal = ("moeserve-ep0", "inproc", 32, 0.9)
    (g,) = goal_rounds(rounds_of((100, 95), (100, 80), (100, 91)), [goal])
    assert g.ratios == (0.95, 0.8, 0.91) and g.median == 0.91 and g.met == 2
    assert "MET by the median (0.91x; 0.80-0.95x, met in 2 of 3 rounds: 0.95, 0.80, 0.91)" in (
        g.line()
    )
    (g,) = goal_rounds(rounds_of((100, 95), (100, 80), (100, 85)), [goal])
    assert "NOT MET by the median (0.85x" in g.line() and g.met == 1


def test_a_round_without_one_side_counts_as_unmeasured() -> None:
    rounds = [*rounds_of((100, 95)), [target("inproc", {32: 100})]]
    (g,) = goal_rounds(rounds, [("moeserve-ep0", "inproc", 32, 0.9)])
    assert g.ratios == (0.95, None) and g.measured == [0.95]
    assert "over 2 rounds: MET" in g.line() and "met in 1 of 1 rounds: 0.95, -" in g.line()
    (g,) = goal_rounds(rounds, [("moeserve-ep2", "moeserve-ep0", 32, 0.85)])
    assert g.line().endswith("NOT MEASURED") and g.median is None


def test_rounds_json_and_plot(tmp_path) -> None:
    rounds = rounds_of((100, 95), (200, 150))
    data = json.loads(json.dumps(rounds_json(rounds, [32], {"repeat": 2}, {"cpus": 2})))
    assert data["rounds"] == 2 and data["round_dirs"] == ["round-1", "round-2"]
    assert data["output_tok_s"] == {"inproc": {"32": [100, 200]}, "moeserve-ep0": {"32": [95, 150]}}
    ep0 = next(g for g in data["goals"] if g["concurrency"] == 32 and g["base"] == "inproc")
    assert ep0["ratios"] == [0.95, 0.75] and ep0["median"] == 0.85 and ep0["met_rounds"] == 1
    write_rounds_plot(tmp_path / "r.png", goal_rounds(rounds), "title")
    assert (tmp_path / "r.png").stat().st_size > 0


def test_repeat_must_be_at_least_one() -> None:
    from serve_app.bench.serve_bench import ServeBenchConfig

    with pytest.raises(ValueError, match="repeat"):
        ServeBenchConfig(repeat=0)


def test_two_rounds_against_a_running_server(qwen3_tiny, tmp_path, capsys) -> None:
    """The command itself: two URL targets (one server under two labels) for two rounds print
    each round's table and the goals over the rounds, and write every round's files."""
    from serve_app.api.routes import create_app
    from serve_app.cli.main import main
    from serve_app.engine.config import EngineConfig
    from serve_app.runtime.factory import build_async_engine
    from serve_app.tools.local_client import LocalEngineClient
    from tests.api.inproc import serving, wait_idle

    engine = build_async_engine(
        EngineConfig(model=str(qwen3_tiny), num_kv_blocks=128, max_model_len=256)
    )
    try:
        app = create_app(LocalEngineClient(engine, "tiny"), api_keys=frozenset())
        with serving(app) as url:
            argv = ["bench", "serve", "--model", str(qwen3_tiny), "--repeat", "2"]
            argv += ["--url", f"inproc={url}", "--url", f"moeserve-ep0={url}"]
            argv += ["--concurrency", "32", "--num-prompts", "4", "--input-len", "16"]
            argv += ["--output-len", "4", "--warmup", "1", "--out", str(tmp_path)]
            assert main(argv) == 0
        wait_idle(engine)
    finally:
        engine.shutdown()
    out = capsys.readouterr().out
    assert "round 1 of 2" in out and "round 2 of 2" in out
    # the same server under both labels: the 32-stream goal is measured in both rounds
    goal = "goal: moeserve-ep0 >= 0.9x inproc output tok/s at concurrency {}, over 2 rounds:"
    verdict = r" (NOT )?MET by the median .* of 2 rounds: [0-9.]+, [0-9.]+\)"
    assert re.search(re.escape(goal.format(32)) + verdict, out)
    assert goal.format(64) + " NOT MEASURED" in out
    for k in (1, 2):
        report = json.loads((tmp_path / f"round-{k}" / "serve_bench.json").read_text())
        assert report["targets"]["moeserve-ep0"]["passes"]["32"]["summary"]["num_ok"] == 4
    data = json.loads((tmp_path / "serve_bench_rounds.json").read_text())
    assert data["rounds"] == 2 and len(data["output_tok_s"]["inproc"]["32"]) == 2
    assert all(x > 0 for x in data["output_tok_s"]["moeserve-ep0"]["32"])
    assert (tmp_path / "serve_bench_rounds.png").stat().st_size > 0
