"""`moeserve bench serve`'s in-process reference: the engine as the Ray app's router replica
runs it. `inproc` has the shared prefix cache's Redis tier on (its own embedded redis-server,
stopped with the engine), `inproc-local` has none."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from pathlib import Path

from serve_app.bench.config import BenchConfig
from serve_app.bench.inproc import build_engine, run_inproc_pass
from serve_app.bench.serve_bench import TargetSpec, parse_targets
from serve_app.procs import pid_alive


def test_both_references_are_targets() -> None:
    got = parse_targets([("launch", "inproc"), ("launch", "inproc-local")])
    assert got == [
        TargetSpec("inproc", launch="inproc"),
        TargetSpec("inproc-local", launch="inproc-local"),
    ]


def test_inproc_publishes_to_its_own_redis_and_stops_it(qwen3_tiny: Path) -> None:
    cache_dir = tempfile.mkdtemp(prefix="moeserve-test-inproc-")
    bench = BenchConfig(max_num_seqs=4, max_num_batched_tokens=256)
    engine = build_engine(str(qwen3_tiny), bench, cache_dir)
    try:
        prompts = ["one two three four " * 12, "five six seven eight " * 12]
        result = asyncio.run(run_inproc_pass(engine, prompts, max_tokens=8, concurrency=2))
        assert [r.completion_tokens for r in result.records] == [8, 8]
        assert engine.engine.connector is not None
        # the server the reference started, in its own dir (under this process's app key)
        (state_file,) = Path(cache_dir).glob("*/state.json")
        state = json.loads(state_file.read_text())
        assert pid_alive(state["pid"])
        assert engine.engine.connector.tier.flush(timeout_s=10)
        assert engine.stats().kv_store.blocks_published > 0
    finally:
        engine.shutdown()
        shutil.rmtree(cache_dir, ignore_errors=True)
    assert not pid_alive(state["pid"])


def test_inproc_local_has_no_shared_tier(qwen3_tiny: Path) -> None:
    engine = build_engine(
        str(qwen3_tiny), BenchConfig(max_num_seqs=4, max_num_batched_tokens=256), None
    )
    try:
        assert engine.engine.connector is None
        assert engine.engine.config.max_num_seqs == 4
    finally:
        engine.shutdown()
