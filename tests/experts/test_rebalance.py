"""plan_rebalance: when a shard is persistently hot, replicate hot experts (exact plans)."""

from __future__ import annotations

import pytest

from serve_app.experts.placement import Placement, place_experts
from serve_app.experts.rebalance import (
    RebalanceConfig,
    RebalancePlan,
    imbalance,
    plan_rebalance,
    window_load,
)

EVEN = place_experts(8, 2)  # shard 0: experts 0-3, shard 1: 4-7
CFG = RebalanceConfig(imbalance_threshold=1.5, min_gain=0.1, min_tokens=100)


def test_imbalance_is_max_over_mean_shard_load():
    assert imbalance(EVEN, [1] * 8) == 1.0
    assert imbalance(EVEN, [0] * 8) == 1.0  # no load is not imbalance
    assert imbalance(EVEN, [700, 100, 100, 100, 0, 0, 0, 0]) == 2.0


def test_even_load_keeps_the_placement():
    assert plan_rebalance(EVEN, [100] * 8, CFG) is None


def test_too_little_traffic_keeps_the_placement():
    assert plan_rebalance(EVEN, [90, 0, 0, 0, 0, 0, 0, 0], CFG) is None


def test_a_hot_expert_gets_a_replica_and_the_moves_are_exact():
    load = [1000, 100, 100, 100, 100, 100, 100, 100]  # shard 0: 1300, shard 1: 400
    plan = plan_rebalance(EVEN, load, CFG)
    # place_experts with one spare slot per shard: expert 0 (and the next hottest per copy,
    # expert 1) on both shards; 850 tokens each.
    assert plan == RebalancePlan(
        placement=Placement(8, ((0, 1, 2, 4, 6), (0, 1, 3, 5, 7))),
        add=((4, 6), (0, 1, 3)),  # loaded before any router dispatches by the new placement
        drop=((3,), (4, 6)),  # freed only after every router switched
        imbalance_before=pytest.approx(1300 / 850),
        imbalance_after=1.0,
    )


def test_below_the_threshold_the_placement_stays():
    load = [700, 100, 100, 100, 100, 100, 100, 100]  # 1000 / 700 = 1.43 <= 1.5
    assert plan_rebalance(EVEN, load, CFG) is None
    assert plan_rebalance(EVEN, load, RebalanceConfig(imbalance_threshold=1.4, min_tokens=0))


def test_no_plan_without_enough_gain():
    # All load on one expert and no spare slot: no copy is possible, nothing improves.
    cfg = RebalanceConfig(imbalance_threshold=1.1, min_tokens=0, spare_slots_per_shard=0)
    assert plan_rebalance(EVEN, [1000, 0, 0, 0, 0, 0, 0, 0], cfg) is None


def test_replicas_follow_the_load_when_it_moves():
    hot = Placement(8, ((0, 1, 2, 4, 6), (0, 1, 3, 5, 7)))
    load = [100] * 7 + [1000]  # now expert 7 is hot; expert 0 is not
    plan = plan_rebalance(hot, load, CFG)
    assert plan is not None and plan.placement.replicas()[7] == (0, 1)
    assert plan.imbalance_after == 1.0


def test_window_load_is_the_difference_of_two_snapshots():
    assert window_load([10, 20, 30], [15, 20, 90]) == [5, 0, 60]
    assert window_load([10, 20], [3, 25]) == [3, 5]  # a router restarted: counts from 0
    with pytest.raises(ValueError):
        window_load([1], [1, 2])


def test_config_and_input_validation():
    for bad in (
        {"imbalance_threshold": 0.9},
        {"min_gain": 1},
        {"min_tokens": -1},
        {"spare_slots_per_shard": -1},
    ):
        with pytest.raises(ValueError):
            RebalanceConfig(**bad)
    with pytest.raises(ValueError):
        plan_rebalance(EVEN, [1] * 7, CFG)
