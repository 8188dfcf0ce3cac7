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
    request_adapters,
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


LORA_PAGE = """# TYPE moeserve_lora_loads_total counter
moeserve_lora_loads_total{replica="r1",version="v"} 18.0
moeserve_lora_loads_total{replica="r2",version="v"} 17.0
moeserve_lora_loads_total{replica="r9",version="other"} 5.0
# TYPE moeserve_lora_evictions_total counter
moeserve_lora_evictions_total{replica="r1",version="v"} 10.0
"""
LORA_PAGE_LATER = LORA_PAGE.replace("18.0", "21.0").replace("10.0", "12.0")


def test_adapter_workload_counters_and_the_resident_share():
    w = RoutingWorkload(num_prefixes=2, requests_per_prefix=20, num_adapters=4)
    names = request_adapters(w, 40)
    assert set(names) == {"ad0", "ad1", "ad2", "ad3"} and names == request_adapters(w, 40)
    assert request_adapters(RoutingWorkload(), 3) == [None, None, None]
    with pytest.raises(ValueError, match="num_adapters"):
        RoutingWorkload(num_adapters=-1)
    before = cache_counters(samples(LORA_PAGE), "v")
    assert before.lora_loads == {"r1": 18, "r2": 17} and before.lora_evictions == {"r1": 10}
    delta = cache_counters(samples(LORA_PAGE_LATER), "v").minus(before)
    rec = RequestRecord(True, 200, None, 0.0, 1.0, 0.25, [], 8, 516, True)
    r = mode_result("prefix_affinity", summarize([rec], 1.0, 4), delta, adapter_requests=40)
    # 3 loads for 40 adapter requests: 37 found their adapter resident
    assert (r.adapter_loads, r.adapter_evictions, r.adapter_resident_share) == (3, 2, 37 / 40)
    assert r.to_json()["adapter_resident_share"] == 37 / 40
    assert targets({"prefix_affinity": r}, 2)["adapter_resident_share>=0.9"] is True
    plain = mode_result("prefix_affinity", summarize([rec], 1.0, 4), delta)
    assert plain.adapter_resident_share is None
    assert "adapter_resident_share>=0.9" not in targets({"prefix_affinity": plain}, 2)
    assert "0.93" in format_table({"prefix_affinity": r})


def test_adapters_are_served_by_every_mode_and_load_as_peft(tmp_path):
    from serve_app.bench.lora_adapters import write_random_adapters
    from serve_app.lora.peft_format import load_adapter
    from serve_app.model.loader import base_shapes
    from tests.conftest import tiny_model_dir

    model = tiny_model_dir("qwen3_moe")
    dirs = write_random_adapters(model, tmp_path, ["ad0", "ad1"], rank=4)
    a0 = load_adapter("ad0", dirs["ad0"], base_shapes(model), max_rank=8)
    a1 = load_adapter("ad1", dirs["ad1"], base_shapes(model), max_rank=8)
    assert a0.digest != a1.digest  # each one its own weights
    w = RoutingWorkload(num_adapters=2)
    cfg = RoutingBenchConfig("m", w, adapter_dirs=tuple(dirs.items()), max_loras=1)
    for mode in ("pow2", "prefix_affinity"):
        assert app_args(cfg, mode, "x")["lora"] == {"adapters": dirs, "max_loras": 1}
    assert "lora" not in app_args(RoutingBenchConfig("m", RoutingWorkload()), "pow2", "x")
    with pytest.raises(ValueError, match="adapter_dirs"):
        RoutingBenchConfig("m", w)
