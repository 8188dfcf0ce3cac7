"""The balancer actor drives real shard actors: plan on skewed reports, add, publish, drop only
after the router switched, and top up a shard recreated from the config's placement."""

from __future__ import annotations

import time

import pytest

from serve_app.experts.balancer import BalancerConfig, Versioned
from serve_app.experts.placement import Placement, place_experts
from serve_app.experts.rebalance import RebalanceConfig
from serve_app.messages import PlacementReport
from tests.conftest import wait_until

pytestmark = pytest.mark.slow

CONFIG = BalancerConfig(
    RebalanceConfig(imbalance_threshold=1.5, min_tokens=100),
    interval_s=0.2,
    window_s=1.0,
    sync_interval_s=0.1,
    router_timeout_s=30.0,
)
SKEW = [1000, 100, 100, 100, 100, 100, 100, 100]  # expert 0 hot: shard 0 carries 1300 of 1700


def test_balancer_rebalances_real_shards_in_the_no_drop_order(ray_cluster, qwen3_tiny):
    from serve_app.deployments.balancer_actor import ExpertBalancerActor
    from serve_app.deployments.expert_actor import ExpertShardActor

    ray = ray_cluster
    model = str(qwen3_tiny)
    placement = place_experts(8, 2)
    config_shards = [list(s) for s in placement.shards]

    def shard(owned):
        return ExpertShardActor.options(num_cpus=0).remote(model, owned, "cpu", "float32", 1)

    shards = [shard(s) for s in config_shards]
    balancer = ExpertBalancerActor.options(num_cpus=0).remote(8, config_shards, CONFIG, 60.0)
    first = ray.get(balancer.register.remote("r1"))
    assert first == Versioned(0, placement)
    used = config_shards

    def report(generation, shards_used):
        placement_used = Placement(8, tuple(tuple(s) for s in shards_used))
        versioned = Versioned(generation, placement_used)
        return PlacementReport("r1", tuple(tokens), versioned, tuple(shards))

    def owned():
        return [ray.get(s.info.remote())["owned"] for s in shards]

    # A router that keeps the old placement: the balancer adds and publishes, never drops.
    tokens = [0] * 8
    state = {}
    deadline = time.monotonic() + 120
    while state.get("generation", 0) == 0:
        assert time.monotonic() < deadline
        tokens = [t + x for t, x in zip(tokens, SKEW, strict=True)]
        ray.get(balancer.sync.remote(report(0, used)))
        state = ray.get(balancer.state.remote())
        time.sleep(0.1)
    hot = state["shards"]
    now = ray.get(balancer.sync.remote(report(0, used)))
    assert (now.generation, [list(s) for s in now.placement.shards]) == (1, hot)
    assert state["draining"]
    assert all(0 in s for s in hot)  # the hot expert is on both shards
    held = owned()
    assert all(set(u) | set(h) == set(o) for u, h, o in zip(used, hot, held, strict=True))
    time.sleep(1.0)  # several balancer intervals: the old placement is still in use
    assert owned() == held and ray.get(balancer.state.remote())["draining"]

    # The router switches and reports the new generation: now the shards free the old copies.
    ray.get(balancer.sync.remote(report(1, hot)))
    wait_until(lambda: not ray.get(balancer.state.remote())["draining"], every=0.1)
    assert owned() == hot

    # Shard 1 "recreated" from the config's placement: the balancer tops it up.
    ray.kill(shards[1])
    shards[1] = shard(config_shards[1])
    ray.get(balancer.sync.remote(report(1, hot)))
    wait_until(lambda: owned()[1] == sorted(set(hot[1]) | set(config_shards[1])), every=0.1)
    for s in [*shards, balancer]:
        ray.kill(s)
