"""bench routing's pure half: the workload, the counters read from /metrics, the verdict."""

from __future__ import annotations

from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families

from serve_app.bench.load import RequestRecord, summarize
from serve_app.bench.routing_bench import RoutingBenchConfig, app_args
from serve_app.bench.routing_report import (
    RoutingWorkload,
    cache_counters,
    format_table,
    make_prompts,
    mode_result,
    targets,
)

PAGE = """# TYPE moeserve_prefix_cache_queried_tokens_total counter
moeserve_prefix_cache_queried_tokens_total{replica="r1",tier="local",version="v"} 600.0
moeserve_prefix_cache_queried_tokens_total{replica="r2",tier="local",version="v"} 400.0
moeserve_prefix_cache_queried_tokens_total{replica="r1",tier="redis",version="v"} 100.0
moeserve_prefix_cache_queried_tokens_total{replica="r9",tier="local",version="other"} 5.0
# TYPE moeserve_prefix_cache_hit_tokens_total counter
moeserve_prefix_cache_hit_tokens_total{replica="r1",tier="local",version="v"} 500.0
moeserve_prefix_cache_hit_tokens_total{replica="r2",tier="local",version="v"} 300.0
moeserve_prefix_cache_hit_tokens_total{replica="r1",tier="redis",version="v"} 96.0
# TYPE moeserve_router_routed_requests_total counter
moeserve_router_routed_requests_total{reason="prefix_match",version="v"} 7.0
moeserve_router_routed_requests_total{reason="no_match",version="v"} 2.0
"""


def samples(text: str):
    return [s for f in text_string_to_metric_families(text) for s in f.samples]


def test_workload_shares_each_prefix_and_shuffles_deterministically():
    w = RoutingWorkload(num_prefixes=3, prefix_len=10, suffix_len=2, requests_per_prefix=4)
    prompts = make_prompts(w, vocab_size=50)
    assert len(prompts) == 12 and Counter(p for p, _ in prompts) == {0: 4, 1: 4, 2: 4}
    for p, ids in prompts:
        assert len(ids) == 12 and all(0 <= t < 50 for t in ids)
        assert ids[:10] == next(i for q, i in prompts if q == p)[:10]
    assert [p for p, _ in prompts] != sorted(p for p, _ in prompts)
    assert make_prompts(w, 50) == prompts
    with pytest.raises(ValueError, match="prefix_len"):
        RoutingWorkload(prefix_len=0)


def test_counters_of_one_version_and_the_mode_result():
    c = cache_counters(samples(PAGE), "v")
    assert c.local_queried == {"r1": 600, "r2": 400} and c.local_hit == {"r1": 500, "r2": 300}
    assert c.redis_hit == {"r1": 96} and c.routed == {"prefix_match": 7, "no_match": 2}
    zero = cache_counters(samples(PAGE), "v").minus(c)
    assert zero.total_queried == 0
    rec = RequestRecord(True, 200, None, 0.0, 1.0, 0.25, [], 8, 516, True)
    r = mode_result("prefix_affinity", summarize([rec], 1.0, 4), c)
    assert (r.prompt_tokens, r.local_hit_share, r.redis_hit_share) == (1000, 0.8, 0.096)
    assert r.load_split == {"replica0": 0.6, "replica1": 0.4}
    assert r.routed == {"no_match": 2, "prefix_match": 7}
    slow = RequestRecord(True, 200, None, 0.0, 1.0, 0.5, [], 8, 516, True)
    p = mode_result("pow2", summarize([slow], 1.0, 4), c)
    assert targets({"pow2": p, "prefix_affinity": r}, 2) == {
        "local_hit_share>=0.8": True,
        "every_replica>=25%": True,
        "no_failures": True,
        "ttft_p50_below_pow2": True,
    }
    assert targets({"pow2": p, "prefix_affinity": r}, 3)["every_replica>=25%"] is False
    assert "prefix_affinity" in format_table({"pow2": p, "prefix_affinity": r})


def test_each_mode_gets_its_routing_and_a_cold_redis_namespace():
    cfg = RoutingBenchConfig("m", RoutingWorkload())
    a, b = app_args(cfg, "pow2", "x"), app_args(cfg, "prefix_affinity", "x")
    assert (a["router"]["routing"], b["router"]["routing"]) == ("pow2", "prefix_affinity")
    assert a["prefix_cache"]["key_prefix"] != b["prefix_cache"]["key_prefix"]
    assert a["version"] != b["version"] and b["router"]["num_replicas"] == 2
    assert "write_policy" not in a["prefix_cache"]  # the app config's default
    selective = RoutingBenchConfig("m", RoutingWorkload(), write_policy="write_through_selective")
    assert app_args(selective, "pow2", "x")["prefix_cache"]["write_policy"] == (
        "write_through_selective"
    )
    with pytest.raises(ValueError, match="modes"):
        RoutingBenchConfig("m", RoutingWorkload(), modes=("random",))
