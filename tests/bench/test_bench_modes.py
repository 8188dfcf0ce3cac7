"""`bench engine --modes` and the decode workload's clock: parsing, timing, the ratio table.
Pure: no model, no engine, no sleeping."""

from __future__ import annotations

import pytest

from serve_app.bench.decode_clock import DecodeClock
from serve_app.bench.machine import parse_cpuinfo
from serve_app.bench.mode_report import mode_table, modes_json
from serve_app.bench.modes import Mode, parse_modes
from serve_app.bench.result import RunResult
from serve_app.bench.workloads import Workload


def test_modes_parse_in_order_with_the_default_dtype():
    modes = parse_modes("fp32,bf16,int8,bf16+int4", default_dtype="float32")
    assert modes == [
        Mode("fp32", "float32", "none"),
        Mode("bf16", "bfloat16", "none"),
        Mode("int8", "float32", "int8"),
        Mode("bf16+int4", "bfloat16", "int4"),
    ]
    assert parse_modes("int8", default_dtype="bfloat16")[0].dtype == "bfloat16"
    assert modes[3].system == "moeserve-bf16+int4"


@pytest.mark.parametrize("bad", ["", "fp16", "int8+int4", "fp32,float32", "bf16+bf16"])
def test_bad_modes_are_refused(bad):
    with pytest.raises(ValueError):
        parse_modes(bad)


def test_decode_clock_starts_when_every_request_has_its_first_token():
    clock = DecodeClock(2, t_submit=0.0)
    clock.step(1.0, [("a", 1)])  # a chunked prefill: b not started yet
    clock.step(3.0, [("a", 1), ("b", 1)])  # every request started: the clock starts here
    clock.step(4.0, [("a", 1), ("b", 1)])
    clock.step(6.0, [("a", 1), ("b", 1)])
    t = clock.result()
    assert (t.decode_tokens, t.decode_s, t.prefill_s, t.total_tokens) == (4, 3.0, 3.0, 7)
    with pytest.raises(RuntimeError):
        DecodeClock(2, 0.0).result()


def _r(system: str, tok: int, workload: str = "fixed") -> RunResult:
    return RunResult(system, workload, tok, 1.0, (1.0, 2.0))


def test_mode_table_gives_each_mode_its_ratio_over_the_first_and_over_vllm():
    modes = parse_modes("fp32,int8")
    w = [Workload("fixed", [], {})]

    def one(fp32: int, int8: int, vllm: int):
        runs = {"moeserve-fp32": _r("moeserve-fp32", fp32), "moeserve-int8": _r("x", int8)}
        return {"fixed": {**runs, "vllm": _r("vllm", vllm)}}

    rounds = [one(100, 150, 200), one(100, 300, 100), one(100, 200, 50)]
    data = modes_json(w, rounds, modes, {"dtype": "float32"}, {}, {}, {})
    row = data["workloads"]["fixed"]
    assert row["vs_baseline"] == {"fp32": 1.0, "int8": 2.0}  # the median round's int8: 200
    assert row["vs_baseline_by_round"]["int8"] == [1.5, 3.0, 2.0]
    assert row["vs_vllm_by_round"]["int8"] == [0.75, 3.0, 4.0]
    table = mode_table(w, rounds, modes, "vllm (float32)", {}, "machine: x")
    assert table.splitlines()[0] == "machine: x"
    assert "int8 by round: / fp32 1.50x 3.00x 2.00x; / vllm 0.75x 3.00x 4.00x" in table
    assert "vllm (float32)" in table


def test_cpuinfo_keeps_the_model_and_the_flags_that_matter():
    text = "model name\t: AMD EPYC 9R14\nflags\t\t: fpu sse avx2 fma avx512f avx512_bf16 amx_tile\n"
    cpu = parse_cpuinfo(text)
    assert cpu.model == "AMD EPYC 9R14"
    assert cpu.flags == ["avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"]


def test_modes_plot_is_written(tmp_path):
    from serve_app.bench.mode_report import write_modes_plot

    modes = parse_modes("fp32,bf16")
    runs = {"moeserve-fp32": _r("moeserve-fp32", 10), "vllm": _r("vllm", 12)}
    path = tmp_path / "modes.png"
    write_modes_plot(path, [Workload("fixed", [], {})], [{"fixed": runs}], modes, "t", "vllm (x)")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
