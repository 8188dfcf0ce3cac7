"""The balancer's state machine: window, plan, publish, drop only after every router switched."""

from __future__ import annotations

import pytest

from serve_app.experts.balancer import Balancer, BalancerConfig, Drop, Versioned
from serve_app.experts.placement import Placement, place_experts
from serve_app.experts.rebalance import RebalanceConfig, RebalancePlan

EVEN = place_experts(8, 2)  # shard 0: experts 0-3, shard 1: 4-7
HOT = Placement(8, ((0, 1, 2, 4, 6), (0, 1, 3, 5, 7)))  # the plan for expert 0 hot
CFG = BalancerConfig(
    RebalanceConfig(imbalance_threshold=1.5, min_tokens=100),
    interval_s=1.0,
    window_s=10.0,
    sync_interval_s=1.0,
    router_timeout_s=5.0,
)
SKEW = [1000, 100, 100, 100, 100, 100, 100, 100]


def _cum(k: int) -> list[int]:
    return [k * x for x in SKEW]


def _hot_balancer() -> tuple[Balancer, RebalancePlan]:
    b = Balancer(EVEN, CFG, now=0.0)
    assert b.register("a", now=0.0) == Versioned(0, EVEN)
    for t in range(11):  # router a reports SKEW per second from t=0
        b.report("a", _cum(t), Versioned(0, EVEN), now=float(t))
    plan = b.step(now=10.0)
    assert isinstance(plan, RebalancePlan)
    return b, plan


def test_no_plan_before_a_full_window_or_with_even_load():
    b = Balancer(EVEN, CFG, now=0.0)
    b.register("a", now=0.0)
    for t in range(10):
        b.report("a", _cum(t), Versioned(0, EVEN), now=float(t))
        assert b.step(now=float(t)) is None  # window not full yet (t < 10)
    even = Balancer(EVEN, CFG, now=0.0)
    for t in range(12):
        even.report("a", [t * 100] * 8, Versioned(0, EVEN), now=float(t))
    assert even.step(now=11.0) is None


def test_window_sums_router_deltas_and_forgets_old_ones():
    b = Balancer(EVEN, CFG, now=0.0)
    b.report("a", [5] * 8, Versioned(0, EVEN), now=0.0)  # first report: baseline only
    b.report("a", [7] * 8, Versioned(0, EVEN), now=1.0)
    b.report("b", [100] * 8, Versioned(0, EVEN), now=1.0)
    b.report("b", [103] * 8, Versioned(0, EVEN), now=2.0)
    assert b.window(now=2.0) == [5] * 8
    assert b.window(now=11.0) == [3] * 8  # the delta at t=1 left the 10 s window
    assert b.window(now=12.0) == [0] * 8


def test_plan_publish_then_drop_only_when_every_live_router_switched():
    b, plan = _hot_balancer()
    assert plan.placement == HOT and plan.add == ((4, 6), (0, 1, 3))
    assert b.publish(plan, now=10.5) == Versioned(1, HOT)
    assert b.required() == ((0, 1, 2, 3, 4, 6), (0, 1, 3, 4, 5, 6, 7))  # old + new
    b.register("b", now=10.6)  # starts now: handed generation 1, never holds the drop
    assert b.step(now=11.0) is None  # router a still reports generation 0
    assert b.report("a", _cum(11), Versioned(0, EVEN), now=11.0) == Versioned(1, HOT)
    assert b.step(now=11.5) is None
    b.report("a", _cum(12), Versioned(1, HOT), now=12.0)
    assert b.step(now=12.0) == Drop(((3,), (4, 6)))
    b.dropped()
    assert b.required() == HOT.shards
    assert b.step(now=13.0) is None  # a fresh window must fill after a switch


def test_a_silent_router_is_not_awaited_forever():
    b, plan = _hot_balancer()
    b.publish(plan, now=10.0)
    b.register("stuck", now=10.0)
    b.report("a", _cum(11), Versioned(1, HOT), now=11.0)
    b._routers["stuck"].generation = 0  # as if it had registered before the publish
    assert b.step(now=14.0) is None  # stuck was seen 4 s ago (< router_timeout_s)
    b.report("a", _cum(15), Versioned(1, HOT), now=15.0)
    assert b.step(now=15.5) == Drop(((3,), (4, 6)))


def test_missing_tops_up_a_recreated_shard():
    b, plan = _hot_balancer()
    b.publish(plan, now=10.0)
    b.dropped()
    # shard 1 was recreated from the config's placement (4-7); shard 0 did not answer
    assert b.missing([None, [4, 5, 6, 7]]) == ((), (0, 1, 3))
    assert b.missing([list(HOT.shards[0]), list(HOT.shards[1])]) == ((), ())


def test_a_recreated_balancer_adopts_the_routers_newer_placement():
    b = Balancer(EVEN, CFG, now=0.0)
    assert b.register("new", now=0.0) == Versioned(0, EVEN)
    assert b.report("a", [0] * 8, Versioned(3, HOT), now=1.0) == Versioned(3, HOT)
    assert b.report("new", [0] * 8, Versioned(0, EVEN), now=1.0) == Versioned(3, HOT)


def test_config_validation():
    with pytest.raises(ValueError):
        BalancerConfig(window_s=0)
    with pytest.raises(ValueError):
        BalancerConfig(sync_interval_s=5.0, router_timeout_s=10.0)


def test_the_app_settings_default_to_the_balancer_defaults():
    from serve_app.config import RebalanceSettings

    assert RebalanceSettings().balancer_config() == BalancerConfig()
    assert not RebalanceSettings().enabled
