"""`moeserve bench serve`, the pure parts: SSE timing, TPOT, percentiles and summaries from
synthetic timings, target parsing, prompt fitting, the report's ratios, goal line and JSON."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest

from serve_app.bench.config import BenchConfig
from serve_app.bench.launcher import (
    first_error_line,
    launch_command,
    moeserve_argv,
    stop_server,
    vllm_argv,
)
from serve_app.bench.load import (
    RequestRecord,
    StreamRecorder,
    completion_body,
    error_message,
    percentile,
    sse_data,
    stats,
    summarize,
    tpot,
)
from serve_app.bench.serve_bench import (
    ServeBenchConfig,
    TargetSpec,
    bench_config,
    client_api_key,
    fit_prompt,
    parse_concurrency,
    parse_targets,
)
from serve_app.bench.serve_report import (
    PassRun,
    TargetRun,
    format_table,
    goal_line,
    ratios,
    report_json,
    write_plot,
)
from serve_app.procs import session_pids


def chunk(text: str) -> dict:
    return {"choices": [{"index": 0, "text": text}]}


def usage(prompt: int, completion: int) -> dict:
    return {"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion}}


def record(ttft: float, latency: float, tokens: int, ok: bool = True, **kw) -> RequestRecord:
    return RequestRecord(
        ok=ok,
        status=200 if ok else kw.get("status", 500),
        error=None if ok else kw.get("error", "boom"),
        start_s=0.0,
        latency_s=latency,
        ttft_s=ttft if ok else None,
        itl_s=kw.get("itl", []),
        completion_tokens=tokens if ok else 0,
        prompt_tokens=kw.get("prompt", 128) if ok else None,
        usage_reported=kw.get("usage_reported", True),
    )


# --- timing of one stream --------------------------------------------------------------------


def test_tpot_formula() -> None:
    assert tpot(1.0, 0.1, 10) == pytest.approx(0.1)  # (1.0 - 0.1) / (10 - 1)
    assert tpot(1.0, 0.1, 1) is None and tpot(1.0, None, 10) is None


def test_recorder_ttft_itl_and_usage_tokens() -> None:
    rec = StreamRecorder(start=10.0, start_s=0.5)
    rec.on_payload(10.2, {"choices": [{"delta": {"role": "assistant"}}]} | {"usage": None})
    rec.on_payload(10.3, chunk("a"))
    rec.on_payload(10.5, chunk("bc"))  # two tokens in one chunk: usage has the true count
    rec.on_payload(10.6, usage(128, 4))
    r = rec.finish(10.7, 200)
    # vllm bench serve: TTFT at the first chunk with non-empty choices, role chunk included
    assert r.ok and r.ttft_s == pytest.approx(0.2)
    assert r.itl_s == pytest.approx([0.1, 0.2])
    assert r.completion_tokens == 4 and r.prompt_tokens == 128 and r.usage_reported
    assert r.latency_s == pytest.approx(0.7) and r.start_s == 0.5
    assert r.tpot_s == pytest.approx((0.7 - 0.2) / 3)


def test_recorder_without_usage_counts_chunks_and_flags_it() -> None:
    rec = StreamRecorder(start=0.0)
    for t in (0.1, 0.2, 0.3):
        rec.on_payload(t, chunk("x"))
    r = rec.finish(0.3, 200)
    assert r.ok and r.completion_tokens == 3 and not r.usage_reported and r.prompt_tokens is None


def test_recorder_in_band_error_and_empty_stream_fail() -> None:
    rec = StreamRecorder(start=0.0)
    rec.on_payload(0.1, chunk("x"))
    rec.on_payload(0.2, {"error": {"message": "engine died", "type": "internal_error"}})
    r = rec.finish(0.2, 200)
    assert not r.ok and r.status == 200 and r.error == "engine died"
    r = StreamRecorder(start=0.0).finish(0.1, 200)
    assert not r.ok and r.error == "stream ended without any token"
    r = StreamRecorder(start=0.0).fail(0.1, 0, "ClientConnectorError: refused")
    assert not r.ok and r.status == 0 and r.ttft_s is None


@pytest.mark.parametrize(
    "line, data",
    [
        (b'data: {"a": 1}\n', '{"a": 1}'),
        ("data:[DONE]", "[DONE]"),
        (b"\n", None),
        (b": keep-alive\n", None),
        (b"event: ping\n", None),
    ],
)
def test_sse_data(line, data) -> None:
    assert sse_data(line) == data


def test_error_message_reads_openai_errors() -> None:
    body = {"error": {"message": "The model `x` does not exist.", "type": "not_found_error"}}
    assert error_message(json.dumps(body)) == "The model `x` does not exist."
    assert error_message("Internal Server Error") == "Internal Server Error"
    assert error_message("") == "empty response"


def test_completion_body_is_what_vllm_bench_serve_sends() -> None:
    b = completion_body("m", "hi", 64)
    assert b["stream"] and b["stream_options"] == {"include_usage": True}
    assert b["ignore_eos"] and b["max_tokens"] == 64 and b["model"] == "m"


# --- percentiles and summaries ---------------------------------------------------------------


@pytest.mark.parametrize("q", [0, 1, 50, 90, 99, 100])
def test_percentile_matches_numpy(q: float) -> None:
    values = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 100.0]
    assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_percentile_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)
    assert percentile([4.0], 99) == 4.0
    assert stats([]) is None


def test_summary_from_synthetic_timings() -> None:
    records = [
        record(0.1, 1.0, 10, itl=[0.1] * 9),
        record(0.3, 2.1, 10, itl=[0.2] * 9),
        record(0.2, 0.2, 1),  # one token: TPOT undefined, left out of TPOT stats
        record(0, 0.05, 0, ok=False, status=503, error="overloaded"),
    ]
    s = summarize(records, duration_s=2.0, concurrency=4)
    assert (s.num_ok, s.num_failed, s.output_tokens) == (3, 1, 21)
    assert s.output_tok_s == pytest.approx(10.5) and s.request_s == pytest.approx(1.5)
    assert s.ttft_ms.mean == pytest.approx(200) and s.ttft_ms.p50 == pytest.approx(200)
    assert s.ttft_ms.p99 == pytest.approx(np.percentile([100, 300, 200], 99))
    assert s.tpot_ms.mean == pytest.approx(150)  # (0.9 / 9 + 1.8 / 9) / 2
    assert s.itl_p99_ms == pytest.approx(200)
    assert s.e2e_p50_ms == pytest.approx(1000) and s.prompt_tokens_mean == 128
    assert s.errors == {"503: overloaded": 1} and s.usage_missing == 0


def test_summary_of_all_failed_pass() -> None:
    s = summarize([record(0, 1, 0, ok=False)], duration_s=1.0, concurrency=1)
    assert s.num_ok == 0 and s.output_tok_s == 0 and s.ttft_ms is None and s.e2e_p99_ms is None
    json.dumps(s.to_json())


# --- targets and prompts ---------------------------------------------------------------------


def test_parse_targets_keeps_order_and_defaults() -> None:
    got = parse_targets([("launch", "moeserve-ep2"), ("url", "ext=http://h:1/v1/")])
    assert got == [
        TargetSpec("moeserve-ep2", launch="moeserve-ep2"),
        TargetSpec("ext", "http://h:1"),
    ]
    assert [t.label for t in parse_targets(None)] == [
        "inproc",
        "moeserve-ep0",
        "moeserve-ep2",
        "vllm",
    ]


@pytest.mark.parametrize(
    "items",
    [
        [("url", "http://h:1")],  # no label
        [("launch", "sglang")],
        [("launch", "vllm"), ("launch", "vllm")],
    ],
)
def test_parse_targets_rejects(items) -> None:
    with pytest.raises(ValueError):
        parse_targets(items)


def test_api_key_for_launched_and_running_servers(monkeypatch) -> None:
    monkeypatch.delenv("MOESERVE_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    assert client_api_key(launched=True) == client_api_key(launched=False) == "sk-openai"
    monkeypatch.setenv("MOESERVE_API_KEY", "k1, k2")
    assert client_api_key(launched=True) == "k1"  # what the moeserve we start will accept
    assert client_api_key(launched=False) == "sk-openai"


def test_concurrency_levels() -> None:
    assert parse_concurrency("1,8,32") == (1, 8, 32)
    with pytest.raises(ValueError):
        parse_concurrency("1,x")
    for bad in ((), (0,), (4, 4)):
        with pytest.raises(ValueError):
            ServeBenchConfig(concurrencies=bad)


def test_a_write_policy_reaches_the_inproc_engine_and_every_launched_server() -> None:
    from serve_app.cli.main import build_parser

    def parse(*flags):
        return bench_config(build_parser().parse_args(["bench", "serve", "--model", "m", *flags]))

    assert parse().prefix_write_policy is None and parse().serve_args == ()
    cfg = parse("--serve-args", "--routers 2", "--prefix-write-policy", "write_through_selective")
    assert cfg.prefix_write_policy == "write_through_selective"
    assert cfg.serve_args == (
        "--routers",
        "2",
        "--prefix-write-policy",
        "write_through_selective",
    )


def test_fit_prompt_cuts_and_pads_to_exact_length() -> None:
    # A toy tokenizer: one token per character, except "ab" merges into one token.
    def encode(t: str) -> list[int]:
        return [ord(c) for c in t.replace("ab", "\x01")]

    def decode(ids: list[int]) -> str:
        return "".join(chr(i) for i in ids).replace("\x01", "ab")

    filler = itertools.cycle([ord("z")])
    ids = [ord(c) for c in "abababxy"]  # 8 ids, but "ab" merges: 5 tokens
    text, n = fit_prompt(ids, 6, encode, decode, filler)
    assert n == 6 and len(encode(text)) == 6
    text, n = fit_prompt([ord(c) for c in "xyzxyzxyz"], 4, encode, decode, filler)
    assert n == 4 and text == "xyzx"


# --- report ----------------------------------------------------------------------------------


def target(label: str, tok_s: dict[int, float], skipped: str | None = None) -> TargetRun:
    run = TargetRun(label, f"launch {label}", skipped=skipped)
    for c, x in tok_s.items():
        recs = [record(0.1, 1.0, int(x), itl=[0.01, 0.02])]
        run.passes.append(PassRun(summarize(recs, 1.0, c), recs, (0.5, 1.5)))
    return run


def test_ratios_against_first_target_that_ran() -> None:
    runs = [
        target("vllm", {}, skipped=".venv-vllm missing"),
        target("moeserve-ep0", {1: 100, 32: 400}),
        target("moeserve-ep2", {1: 50, 32: 300}),
    ]
    r = ratios(runs, [1, 32])
    assert r["moeserve-ep2"] == {1: 0.5, 32: 0.75} and r["moeserve-ep0"] == {1: 1.0, 32: 1.0}
    assert r["vllm"] == {1: None, 32: None}
    assert "NOT MET (0.75x" in goal_line(runs)  # ep2 >= 0.85x ep0
    assert "MET (0.75x" in goal_line(runs, ("moeserve-ep2", "moeserve-ep0", 32, 0.7))
    table = format_table(runs, [1, 32])
    assert "vs moeserve-ep0" in table and "skipped: .venv-vllm missing" in table


def test_goal_line_verdicts() -> None:
    ep0, ep2 = target("moeserve-ep0", {32: 400}), target("moeserve-ep2", {32: 200})
    assert "NOT MET (0.50x" in goal_line([ep0, ep2])
    line = goal_line([ep0, target("moeserve-ep2", {8: 200})])
    assert "NOT MEASURED (no pass of moeserve-ep2 at 32)" in line


def test_report_json_shape(tmp_path) -> None:
    runs = [target("a", {1: 10, 8: 40}), target("b", {}, skipped="no venv")]
    data = json.loads(json.dumps(report_json(runs, [1, 8], {"num_prompts": 1}, {"cpus": 2})))
    assert set(data) == {"config", "machine", "baseline", "goal", "goals", "ratios", "targets"}
    assert data["baseline"] == "a" and data["ratios"]["a"] == {"1": 1.0, "8": 1.0}
    a = data["targets"]["a"]["passes"]["8"]
    assert a["summary"]["output_tok_s"] == 40 and a["loadavg"] == [0.5, 1.5]
    assert a["cpu_s"] is None and a["serving_cpu_ms_per_token"] is None
    assert set(a["summary"]["ttft_ms"]) == {"mean", "p50", "p90", "p99"}
    assert a["records"][0]["completion_tokens"] == 40 and a["records"][0]["itl_s"] == [0.01, 0.02]
    assert data["targets"]["b"] == {
        "source": "launch b",
        "skipped": "no venv",
        "model": None,
        "command": None,
        "log": None,
        "passes": {},
    }
    write_plot(tmp_path / "p.png", runs, [1, 8], "title")
    assert (tmp_path / "p.png").stat().st_size > 0


# --- launcher ----------------------------------------------------------------------------------


def test_launch_commands(monkeypatch, tmp_path) -> None:
    from serve_app.bench import vllm_baseline

    argv = moeserve_argv("/m", 8123, 2, BenchConfig())
    serve = argv[argv.index("serve") :]
    assert serve[:7] == ["serve", "--model", "/m", "--host", "127.0.0.1", "--port", "8123"]
    assert serve[-3:] == ["--ray", "--ep", "2"]
    assert "--ray" not in moeserve_argv("/m", 1, None, BenchConfig())
    v = vllm_argv(tmp_path / "python", "/m", 9, "tiny", BenchConfig())
    assert v[1].endswith("vllm_cli.py") and v[2:4] == ["serve", "/m"]
    assert {"--enforce-eager", "float32", "--served-model-name"} <= set(v)
    monkeypatch.setattr(vllm_baseline, "vllm_python", lambda: None)
    assert "missing" in launch_command("vllm", "/m", 9, str(tmp_path))
    launch = launch_command("moeserve", "/m", 9, str(tmp_path))
    assert launch.env["MOESERVE_RUN_DIR"] == str(tmp_path)


def test_first_error_line_finds_the_root_cause(tmp_path) -> None:
    log = tmp_path / "server.log"
    log.write_text(
        "WARNING [utils.py:1] errors like `OSError: [Errno 24]` may follow\n"
        "(Worker pid=1) ERROR [x.py:9] RuntimeError: Unsupported head_dim=16\n"
        "(EngineCore pid=2) ERROR [core.py:1] EngineDeadError: EngineCore died\n"
    )
    assert first_error_line(log) == "RuntimeError: Unsupported head_dim=16"
    assert first_error_line(tmp_path / "missing.log") is None


@pytest.mark.parametrize("ignore_term", [False, True])
def test_stop_server_ends_its_whole_session(ignore_term: bool) -> None:
    # The server starts a child (as vLLM and Ray do); one variant then ignores SIGTERM.
    code = (
        "import signal, subprocess, sys, time\n"
        "subprocess.Popen(['sleep', '60'])\n"
        f"if {ignore_term}: signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('up', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True
    )
    assert proc.stdout.readline() == b"up\n"
    stop_server(proc, grace_s=0.5)
    assert proc.returncode is not None
    assert session_pids(proc.pid) == []  # nothing of its session runs (zombies aside)
