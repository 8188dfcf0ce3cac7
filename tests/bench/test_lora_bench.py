"""`moeserve bench lora` on the tiny model with tiny counts: it runs both workloads, writes the
JSON (each round's pair, ratio, errors, adapter loads) and the PNG, with no errors. No timing
is asserted. Plus the pure pieces: Zipf draws and P99."""

from __future__ import annotations

import json

import pytest

from serve_app.bench.lora_bench import RunStats, zipf_choices
from serve_app.bench.lora_report import PairResult, p99
from serve_app.cli.main import main
from tests.conftest import tiny_model_dir

pytest.importorskip("peft")


def test_bench_lora_writes_both_workloads_with_no_errors(tmp_path):
    out = tmp_path / "out"
    rc = main(
        [
            "bench", "lora", "--model", str(tiny_model_dir("qwen3_moe")), "--num-prompts", "4",
            "--input-len", "8", "--output-len", "2", "--mixed-adapters", "2",
            "--zipf-adapters", "6", "--zipf-requests", "8", "--concurrency", "2",
            "--max-loras", "3", "--max-loras-per-batch", "2", "--rank", "4", "--no-bandwidth",
            "--adapter-dir", str(tmp_path / "adapters"), "--out", str(out),
        ]
    )  # fmt: skip
    assert rc == 0
    data = json.loads((out / "lora_bench.json").read_text())
    assert data["config"]["zipf_adapters"] == 6 and data["machine"]["cpu_model"]
    mixed, zipf = data["workloads"]["mixed"], data["workloads"]["zipf"]
    assert mixed["summary"]["goal"] == ">= 0.8" and zipf["summary"]["goal"] == "<= 2.0"
    assert mixed["summary"]["errors"] == 0 and zipf["summary"]["errors"] == 0
    (m,), (z,) = mixed["rounds"], zipf["rounds"]
    assert m["base"]["output_tokens"] == m["mixed"]["output_tokens"] == 4 * 2
    assert z["single"]["output_tokens"] == z["zipf"]["output_tokens"] == 8 * 2
    assert z["lora_loads"] >= 1 and z["zipf"]["p99_ttft_s"] > 0
    assert (out / "lora_bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_zipf_draws_favour_the_first_adapters():
    picks = zipf_choices(200, 2000, 1.0, seed=0)
    assert picks == zipf_choices(200, 2000, 1.0, seed=0)  # seeded
    assert picks.count(0) > picks.count(1) > picks.count(9) and max(picks) < 200


def test_p99_and_the_goal():
    assert p99([float(i) for i in range(1, 101)]) == 99.0 and p99([3.0]) == 3.0
    fast, slow = RunStats(10, 1.0, [0.1] * 10), RunStats(10, 1.0, [0.1] * 9 + [0.3])
    assert PairResult("zipf", fast, slow, {}).ratio == pytest.approx(3.0)
    assert not PairResult("zipf", fast, slow, {}).met
    assert PairResult("mixed", fast, RunStats(9, 1.0, []), {}).met  # 0.9x >= 0.8
    assert not PairResult("mixed", fast, RunStats(9, 1.0, [], errors=1), {}).met
