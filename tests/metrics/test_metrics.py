"""The metrics package without Ray: the node-agent merge, the recording API on the in-process
backend, the engine reporter's counters and imbalance, rollout recording."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from serve_app.engine.stats import EngineStats
from serve_app.metrics import CATALOG, Metrics
from serve_app.metrics.backends import LocalBackend
from serve_app.metrics.catalog import LATENCY_BUCKETS_S, SERVE_PASSTHROUGH
from serve_app.metrics.exposition import merge_ray_expositions
from serve_app.metrics.recorder import ROLLOUT_STATES
from serve_app.metrics.reporter import EngineReporter, imbalance_ratio
from serve_app.rollout.state import PHASES

RAY = (
    'Component="core_worker",NodeAddress="10.0.0.{n}",SessionName="session_x",'
    'Version="2.60.0",WorkerId="{w}",otel_scope_name="ray._private.telemetry",'
    'otel_scope_schema_url="",otel_scope_version=""'
)


def node_page(n: int, worker: str, requests: float) -> str:
    r = RAY.format(n=n, w=worker)
    return f"""# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{{generation="0"}} 2297.0
# HELP ray_moeserve_requests_total Finished API requests.
# TYPE ray_moeserve_requests_total counter
ray_moeserve_requests_total{{{r},code="200",route="/v1/completions",version="v1"}} {requests}
# HELP ray_moeserve_ttft_seconds TTFT.
# TYPE ray_moeserve_ttft_seconds histogram
ray_moeserve_ttft_seconds_bucket{{{r},le="0.5",route="/v1/completions",version="v1"}} 1.0
ray_moeserve_ttft_seconds_bucket{{{r},le="+Inf",route="/v1/completions",version="v1"}} 2.0
ray_moeserve_ttft_seconds_count{{{r},route="/v1/completions",version="v1"}} 2.0
ray_moeserve_ttft_seconds_sum{{{r},route="/v1/completions",version="v1"}} 1.5
# HELP ray_serve_deployment_replica_healthy Tracks healthy replicas.
# TYPE ray_serve_deployment_replica_healthy gauge
ray_serve_deployment_replica_healthy{{{r},application="moeserve",deployment="router"}} 1.0
# HELP ray_serve_num_router_requests Not passed through.
# TYPE ray_serve_num_router_requests counter
ray_serve_num_router_requests{{{r},deployment="router"}} 5.0
"""


def samples(text: str) -> dict[tuple, float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_merge_renames_drops_bookkeeping_labels_and_keeps_one_series_per_process():
    text = merge_ray_expositions(
        [node_page(1, "w1", 3.0), node_page(2, "w2", 4.0)], SERVE_PASSTHROUGH
    )
    got = samples(text)
    req = (("code", "200"), ("route", "/v1/completions"), ("version", "v1"))
    assert got[("moeserve_requests_total", (*req[:2], ("version", "v1"), ("worker", "w1")))] == 3
    assert got[("moeserve_requests_total", (*req[:2], ("version", "v1"), ("worker", "w2")))] == 4
    bucket = (("le", "0.5"), ("route", "/v1/completions"), ("version", "v1"), ("worker", "w1"))
    assert got[("moeserve_ttft_seconds_bucket", bucket)] == 1
    healthy = [k for k in got if k[0] == "ray_serve_deployment_replica_healthy"]
    assert len(healthy) == 2
    names = {k[0] for k in got}
    assert not any(n.startswith(("python_", "ray_moeserve", "ray_serve_num")) for n in names)
    # every family's HELP and TYPE exactly once, even though both nodes export it
    assert text.count("# TYPE moeserve_requests_total counter") == 1
    assert "SessionName" not in text and "otel_scope" not in text and 'Version="' not in text


def test_merge_of_nothing_is_an_empty_page():
    assert merge_ray_expositions([]) == ""
    assert merge_ray_expositions(["# HELP x y\n# TYPE x counter\nx 1\n"]) == ""


def key(**labels: str) -> tuple:
    return tuple(sorted(labels.items()))


def metrics() -> Metrics:
    return Metrics(LocalBackend())


def page(m: Metrics) -> dict[tuple, float]:
    return samples(asyncio.run(m.backend.exposition()))


def test_recording_api_checks_names_kinds_and_labels():
    m = metrics()
    labels = {"version": "v1", "route": "/v1/completions", "code": "200"}
    m.inc("moeserve_requests_total", 1, **labels)
    m.inc("moeserve_requests_total", 0, **labels)  # ignored, not an error
    m.observe("moeserve_request_duration_seconds", 0.3, **labels)
    got = page(m)
    key = tuple(sorted(labels.items()))
    assert got[("moeserve_requests_total", key)] == 1
    assert got[("moeserve_request_duration_seconds_bucket", (*key[:1], ("le", "0.5"), *key[1:]))]
    with pytest.raises(ValueError, match="labels"):
        m.inc("moeserve_requests_total", 1, version="v1")
    with pytest.raises(ValueError, match="not a gauge"):
        m.set("moeserve_requests_total", 1, **labels)
    with pytest.raises(ValueError, match="not a counter"):
        m.inc("moeserve_no_such_total", 1)


def test_catalog_follows_prometheus_conventions():
    for spec in CATALOG:
        assert spec.name.startswith("moeserve_")
        assert spec.name.endswith("_total") == (spec.kind == "counter"), spec.name
        if spec.kind == "histogram":
            assert spec.name.endswith("_seconds") and list(spec.buckets) == sorted(spec.buckets)
    assert 0.5 in LATENCY_BUCKETS_S  # the P99 > 500 ms alert's threshold


def test_rollout_weights_state_and_rollbacks():
    assert ROLLOUT_STATES == PHASES
    m = metrics()
    m.record_rollout("moeserve", {"v2": 10, "v1": 90}, "progressing", step=2)
    m.record_rollback("moeserve", "error_rate")
    got = page(m)
    weight = "moeserve_rollout_weight_ratio"
    assert got[(weight, (("app", "moeserve"), ("version", "v2")))] == pytest.approx(0.1)
    assert got[(weight, (("app", "moeserve"), ("version", "v1")))] == pytest.approx(0.9)
    states = {k[1][1][1]: v for k, v in got.items() if k[0] == "moeserve_rollout_state"}
    assert states == {s: float(s == "progressing") for s in PHASES}
    assert got[("moeserve_rollout_step", (("app", "moeserve"),))] == 2
    reason = (("app", "moeserve"), ("reason", "error_rate"))
    assert got[("moeserve_rollout_rollbacks_total", reason)] == 1
    with pytest.raises(ValueError, match="unknown rollout state"):
        m.record_rollout("moeserve", {"v1": 1.0}, "exploded")


def stats(**kw) -> EngineStats:
    base = dict(
        num_running=2,
        num_waiting=1,
        kv_blocks_total=100,
        kv_blocks_used=25,
        prefix_queried_tokens=0,
        prefix_hit_tokens=0,
        num_preemptions=0,
    )
    return EngineStats(**{**base, **kw})


def test_engine_reporter_turns_cumulative_stats_into_gauges_and_counters():
    m = metrics()
    now = [0.0]
    feed = iter(
        [
            stats(num_preemptions=2, prefix_queried_tokens=64, prefix_hit_tokens=32,
                  expert_tokens=(10, 10, 10, 10)),
            stats(num_preemptions=5, prefix_queried_tokens=96, prefix_hit_tokens=32,
                  prefix_remote_queried_tokens=16, prefix_remote_hit_tokens=16,
                  expert_tokens=(40, 10, 10, 20)),
            stats(num_preemptions=1, expert_tokens=(40, 10, 10, 20)),  # engine restarted
        ]
    )  # fmt: skip
    rep = EngineReporter(m, "v1", "r1", lambda: next(feed), lambda: (7, 3), lambda: now[0])
    rep.report()
    now[0] = 1.0
    rep.report()
    got = page(m)
    r = {"replica": "r1", "version": "v1"}
    assert got[("moeserve_running_requests", key(**r))] == 2
    assert got[("moeserve_kv_cache_usage_ratio", key(**r))] == 0.25
    assert got[("moeserve_kv_cache_total_blocks", key(**r))] == 100
    assert got[("moeserve_preemptions_total", key(**r))] == 5
    local, redis = key(**r, tier="local"), key(**r, tier="redis")
    assert got[("moeserve_prefix_cache_queried_tokens_total", local)] == 96
    assert got[("moeserve_prefix_cache_hit_tokens_total", local)] == 32
    assert got[("moeserve_prefix_cache_hit_tokens_total", redis)] == 16
    assert got[("moeserve_expert_tokens_total", key(**r, expert="0"))] == 40
    assert got[("moeserve_expert_shard_tokens_total", key(**r, shard="1"))] == 3
    # between the two snapshots the experts got (30, 0, 0, 10): max 30 / mean 10
    assert got[("moeserve_expert_imbalance_ratio", key(**r))] == pytest.approx(3.0)
    rep.report()
    assert page(m)[("moeserve_preemptions_total", key(**r))] == 6  # a restart counts from zero


def test_imbalance_ratio():
    assert imbalance_ratio((5, 5), (0, 0)) == 1.0
    assert imbalance_ratio((9, 1, 1, 1), (1, 1, 1, 1)) == 4.0
    assert imbalance_ratio((1, 1), (1, 1)) is None


def test_lora_adapters_per_replica_and_vllm_style_info():
    m = metrics()
    base = dict(num_running=1, num_waiting=0, kv_blocks_total=8, kv_blocks_used=1,
                prefix_queried_tokens=0, prefix_hit_tokens=0, num_preemptions=0)  # fmt: skip
    feed = iter([
        EngineStats(**base, lora_resident=2, lora_loads=2, lora_max=4, lora_running=("a", "b")),
        EngineStats(**base, lora_resident=3, lora_loads=4, lora_host_loads=1, lora_evictions=1,
                    lora_max=4, lora_running=("c",), lora_waiting=("a",), lora_host=2,
                    lora_resident_bytes=300, lora_budget_bytes=400),
    ])  # fmt: skip
    rep = EngineReporter(m, "v1", "r1", lambda: next(feed))
    rep.report()
    rep.report()
    got = page(m)
    labels = (("replica", "r1"), ("version", "v1"))
    assert got[("moeserve_lora_resident_adapters", labels)] == 3
    assert got[("moeserve_lora_loads_total", (*labels[:1], ("source", "disk"), *labels[1:]))] == 3
    assert got[("moeserve_lora_loads_total", (*labels[:1], ("source", "host"), *labels[1:]))] == 1
    assert got[("moeserve_lora_resident_bytes", labels)] == 300
    assert got[("moeserve_lora_memory_budget_bytes", labels)] == 400
    assert got[("moeserve_lora_host_adapters", labels)] == 2
    assert got[("moeserve_lora_evictions_total", labels)] == 1
    info = {k[1]: v for k, v in got.items() if k[0] == "moeserve_lora_requests_info"}
    old = (("max_lora", "4"), ("running_lora_adapters", "a,b"), ("waiting_lora_adapters", ""))
    new = (("max_lora", "4"), ("running_lora_adapters", "c"), ("waiting_lora_adapters", "a"))
    assert info[old] == 0 and info[new] > 1.7e9  # the time, as vLLM sets it
