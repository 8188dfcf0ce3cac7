"""The transport benchmark's pure parts: percentiles, payload sizes, config checks. No Ray."""

from __future__ import annotations

import pytest
import torch

from serve_app.bench.transport import (
    TransportBenchConfig,
    format_table,
    latency_stats,
    make_payload,
    payload_bytes,
)


def test_latency_stats_nearest_rank_in_ms() -> None:
    s = latency_stats([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert s.p50_ms == pytest.approx(50.0)
    assert s.p99_ms == pytest.approx(99.0)
    assert s.mean_ms == pytest.approx(50.5)
    assert s.n == 100
    one = latency_stats([0.002])
    assert one.p50_ms == one.p99_ms == pytest.approx(2.0)
    with pytest.raises(ValueError):
        latency_stats([])


def test_payload_shapes_dtypes_and_bytes() -> None:
    cfg = TransportBenchConfig()
    p = make_payload(8, cfg, torch.Generator().manual_seed(0), as_numpy=False)
    assert tuple(p.x.shape) == (8, 512) and p.x.dtype == torch.float32
    assert tuple(p.topk_ids.shape) == (8, 2) and p.topk_ids.dtype == torch.int64
    assert tuple(p.topk_weights.shape) == (8, 2) and p.topk_weights.dtype == torch.float32
    n = make_payload(8, cfg, torch.Generator().manual_seed(0), as_numpy=True)
    assert sum(a.nbytes for a in n) == payload_bytes(8, cfg) == 8 * (512 * 4 + 2 * 8 + 2 * 4)


@pytest.mark.parametrize(
    "kwargs",
    [{"iters": 0}, {"warmup": -1}, {"num_shards": 0}, {"token_counts": ()}, {"token_counts": (0,)}],
)
def test_config_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        TransportBenchConfig(**kwargs)


def test_format_table_marks_missing_cells() -> None:
    cfg = TransportBenchConfig(token_counts=(1, 8))
    stats = {"p50_ms": 1.0, "p99_ms": 2.0, "mean_ms": 1.1, "n": 3}
    report = {
        "config": {"num_shards": 2, "iters": 3, "warmup": 0},
        "machine": {"cpu_count": 2},
        "loadavg_1m": (0.1, 0.2),
        "payload_bytes_per_shard": {t: payload_bytes(t, cfg) for t in cfg.token_counts},
        "results": {"actor_numpy": {1: stats}},
    }
    lines = format_table(report).splitlines()
    assert "actor_numpy" in lines[0] and "cgraph_numpy" not in lines[0]
    assert "1.00 /   2.00" in lines[2]
    assert "n/a" in lines[3]
