"""The router autoscaling policy: exact targets for each trigger, hysteresis, bounds, no Ray."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest

from autoscaling.policy import (
    Decision,
    PolicyConfig,
    PolicyState,
    ServePolicy,
    decide,
    serve_policy,
)
from autoscaling.signals import (
    KV_USE_KEY,
    RUNNING_KEY,
    TTFT_P90_KEY,
    WAITING_KEY,
    FleetSignals,
    RouterSignals,
    aggregate,
    signals_by_replica,
)

CFG = PolicyConfig(
    min_replicas=1,
    max_replicas=6,
    target_running_per_replica=10,
    max_waiting_per_replica=2,
    kv_high=0.9,
    ttft_slo_ms=1000,
    upscale_step=1,
    upscale_cooldown_s=30,
    downscale_delay_s=300,
    downscale_band=0.6,
)
T0 = 1000.0


def fleet(n: int, waiting=0.0, running=0.0, kv=0.1, ttft=100.0) -> FleetSignals:
    """n replicas reporting the same values."""
    return aggregate([RouterSignals(waiting, running, kv, ttft)] * n)


def idle(n: int) -> FleetSignals:
    return fleet(n, waiting=0, running=2, kv=0.1, ttft=None)


# --- aggregation ---------------------------------------------------------------------------


def test_aggregate_sums_queues_and_takes_max_kv_and_max_mean_ttft():
    s = aggregate(
        [
            RouterSignals(waiting=3, running=10, kv_use=0.5, ttft_p90_ms=200),
            RouterSignals(waiting=1, running=4, kv_use=0.8, ttft_p90_ms=600),
            RouterSignals(waiting=None, running=None, kv_use=None, ttft_p90_ms=None),
        ]
    )
    assert s == FleetSignals(
        reporting=2,
        waiting=4,
        running=14,
        kv_use_max=0.8,
        ttft_p90_max_ms=600,
        ttft_p90_mean_ms=400,
    )


def test_aggregate_of_nothing_is_all_missing():
    assert aggregate([]) == FleetSignals()
    assert aggregate([RouterSignals()]) == FleetSignals()


def test_aggregate_skips_missing_ttft_in_the_mean():
    s = aggregate([RouterSignals(0, 1, 0.2, None), RouterSignals(0, 1, 0.3, 300)])
    assert (s.ttft_p90_mean_ms, s.ttft_p90_max_ms, s.reporting) == (300, 300, 2)


def test_stats_round_trip_and_missing_keys_stay_missing():
    r = RouterSignals(waiting=2, running=5, kv_use=0.25, ttft_p90_ms=None)
    assert r.to_stats() == {WAITING_KEY: 2.0, RUNNING_KEY: 5.0, KV_USE_KEY: 0.25}
    assert RouterSignals.from_stats(r.to_stats()) == r
    assert RouterSignals.from_stats({TTFT_P90_KEY: float("nan"), "other": 1.0}) == RouterSignals()


def test_signals_by_replica_regroups_serve_metrics():
    metrics = {
        WAITING_KEY: {"a": 1.0, "b": 0.0},
        RUNNING_KEY: {"a": 3.0},
        "running_requests": {"a": 9.0},  # Serve's own key: ignored
    }
    assert signals_by_replica(metrics) == {
        "a": RouterSignals(waiting=1.0, running=3.0),
        "b": RouterSignals(waiting=0.0),
    }


# --- scale up ------------------------------------------------------------------------------


def test_queue_scales_up_to_the_demand_at_once():
    # 2 replicas, 30 waiting + 20 running = 50 sequences at 10 per replica -> 5 replicas.
    d = decide(fleet(2, waiting=15, running=10), 2, CFG, PolicyState(), T0)
    assert d == Decision(5, PolicyState(last_scale_up_at=T0))


def test_small_queue_over_threshold_adds_at_least_one_step():
    # 5 waiting > 2 per replica x 2, but demand (5 + 4) / 10 rounds up to only 1 replica.
    d = decide(fleet(1, waiting=5, running=4), 2, CFG, PolicyState(), T0)
    assert d.target == 3


def test_queue_at_threshold_is_not_a_breach():
    d = decide(fleet(2, waiting=2, running=5), 2, CFG, PolicyState(), T0)
    assert d == Decision(2, PolicyState())


def test_ttft_slo_breach_scales_up_one_step():
    d = decide(fleet(2, running=5, ttft=1500), 2, CFG, PolicyState(), T0)
    assert d == Decision(3, PolicyState(last_scale_up_at=T0))


def test_one_slow_replica_is_not_a_fleet_slo_breach():
    s = aggregate([RouterSignals(0, 5, 0.2, 1500), RouterSignals(0, 5, 0.2, 100)])  # mean 800
    assert decide(s, 2, CFG, PolicyState(), T0).target == 2


def test_kv_pressure_scales_up_one_step():
    d = decide(fleet(3, running=5, kv=0.9), 3, CFG, PolicyState(), T0)
    assert d == Decision(4, PolicyState(last_scale_up_at=T0))


def test_upscale_step_is_configurable():
    cfg = PolicyConfig(max_replicas=8, upscale_step=2)
    assert decide(fleet(2, kv=0.95), 2, cfg, PolicyState(), T0).target == 4


def test_no_second_scale_up_within_the_cooldown():
    state = PolicyState(last_scale_up_at=T0)
    hot = fleet(3, running=5, kv=0.95)
    assert decide(hot, 3, CFG, state, T0 + 29) == Decision(3, state)
    assert decide(hot, 3, CFG, state, T0 + 30) == Decision(4, PolicyState(last_scale_up_at=T0 + 30))


def test_breach_resets_a_low_load_stretch():
    d = decide(fleet(3, kv=0.95), 3, CFG, PolicyState(low_since=T0), T0 + 100)
    assert d.state.low_since is None


# --- scale down ----------------------------------------------------------------------------


def test_scale_down_waits_for_the_delay_then_steps_by_one():
    n, state, now = 4, PolicyState(), T0
    d = decide(idle(n), n, CFG, state, now)
    assert d == Decision(4, PolicyState(low_since=T0))
    d = decide(idle(n), n, CFG, d.state, T0 + 299)
    assert d == Decision(4, PolicyState(low_since=T0))
    d = decide(idle(n), n, CFG, d.state, T0 + 300)
    assert d == Decision(3, PolicyState(low_since=T0 + 300))
    # The next step needs another full delay, even though load is still low.
    d = decide(idle(3), 3, CFG, d.state, T0 + 301)
    assert d == Decision(3, PolicyState(low_since=T0 + 300))
    d = decide(idle(3), 3, CFG, d.state, T0 + 600)
    assert d == Decision(2, PolicyState(low_since=T0 + 600))


def test_a_busy_tick_restarts_the_downscale_delay():
    d = decide(idle(3), 3, CFG, PolicyState(), T0)
    busy = fleet(3, waiting=0, running=7)  # 3 x 7 over 2 replicas = 10.5 each > 0.6 x 10
    d = decide(busy, 3, CFG, d.state, T0 + 200)
    assert d == Decision(3, PolicyState())
    d = decide(idle(3), 3, CFG, d.state, T0 + 310)
    assert d == Decision(3, PolicyState(low_since=T0 + 310))


@pytest.mark.parametrize(
    "signals",
    [
        fleet(3, waiting=1, running=0),  # anything queued
        fleet(3, running=4.5),  # 3 x 4.5 over 2 replicas = 6.75 each > 0.6 x 10
        fleet(3, running=0, kv=0.4),  # 0.4 x 3/2 = 0.6 > 0.6 x 0.9
        fleet(3, running=0, ttft=700),  # slowest replica above 0.6 x SLO
    ],
)
def test_not_low_enough_to_drop_a_replica(signals):
    d = decide(signals, 3, CFG, PolicyState(low_since=T0), T0 + 1000)
    assert d == Decision(3, PolicyState())


def test_low_load_within_band_counts():
    s = fleet(3, running=4, kv=0.3)  # 3 x 4 over 2 replicas = 6 each <= 6; 0.3 x 3/2 <= 0.54
    assert decide(s, 3, CFG, PolicyState(low_since=T0), T0 + 300).target == 2


def test_scale_to_zero_only_when_nothing_runs():
    cfg = PolicyConfig(min_replicas=0, max_replicas=2, downscale_delay_s=60)
    state = PolicyState(low_since=T0)
    assert decide(fleet(1, running=1), 1, cfg, state, T0 + 60).target == 1
    assert decide(fleet(1, running=0), 1, cfg, state, T0 + 60).target == 0


def test_scale_to_zero_waits_for_requests_queued_at_handles():
    cfg = PolicyConfig(min_replicas=0, max_replicas=2, downscale_delay_s=60)
    state = PolicyState(low_since=T0)
    quiet = fleet(1, running=0)
    assert decide(replace(quiet, requests=1.0), 1, cfg, state, T0 + 60).target == 1
    assert decide(replace(quiet, requests=0.0), 1, cfg, state, T0 + 60).target == 0


def test_cold_start_from_zero_when_a_request_waits_even_in_the_cooldown():
    cfg = PolicyConfig(min_replicas=0, max_replicas=3, upscale_cooldown_s=30)
    cooling = PolicyState(last_scale_up_at=T0)
    d = decide(FleetSignals(requests=2.0), 0, cfg, cooling, T0 + 1)
    assert d == Decision(1, PolicyState(last_scale_up_at=T0 + 1))


@pytest.mark.parametrize("requests", [0.0, None])
def test_stay_at_zero_without_requests(requests):
    cfg = PolicyConfig(min_replicas=0, max_replicas=3)
    assert decide(FleetSignals(requests=requests), 0, cfg, PolicyState(), T0).target == 0


# --- missing data --------------------------------------------------------------------------


def test_hold_when_no_replica_reports():
    d = decide(FleetSignals(), 3, CFG, PolicyState(low_since=T0), T0 + 1000)
    assert d == Decision(3, PolicyState())


def test_no_scale_down_while_a_replica_has_not_reported():
    # 3 replicas committed, only 2 report (the third may be starting, or busy and silent).
    d = decide(idle(2), 3, CFG, PolicyState(low_since=T0), T0 + 1000)
    assert d == Decision(3, PolicyState())


def test_no_scale_down_without_kv_use():
    s = aggregate([RouterSignals(waiting=0, running=0)] * 3)
    assert decide(s, 3, CFG, PolicyState(low_since=T0), T0 + 1000).target == 3


def test_partial_data_still_scales_up_on_a_breach():
    s = aggregate([RouterSignals(kv_use=0.97)])  # one replica, KV only
    assert decide(s, 3, CFG, PolicyState(), T0).target == 4


# --- bounds --------------------------------------------------------------------------------


def test_never_above_max():
    d = decide(fleet(5, waiting=100, running=50), 5, CFG, PolicyState(), T0)
    assert d == Decision(6, PolicyState(last_scale_up_at=T0))
    d = decide(fleet(6, waiting=100, kv=0.99), 6, CFG, PolicyState(), T0)
    assert d == Decision(6, PolicyState())  # at max: hold, no cooldown started


def test_never_below_min():
    d = decide(idle(1), 1, CFG, PolicyState(low_since=T0), T0 + 10_000)
    assert d == Decision(1, PolicyState())


def test_out_of_bounds_current_is_pulled_in():
    assert decide(FleetSignals(), 0, CFG, PolicyState(), T0).target == 1
    assert decide(fleet(9, kv=0.99), 9, CFG, PolicyState(), T0).target == 6


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_replicas": -1},
        {"min_replicas": 3, "max_replicas": 2},
        {"target_running_per_replica": 0},
        {"max_waiting_per_replica": -1},
        {"kv_high": 0},
        {"kv_high": 1.5},
        {"ttft_slo_ms": 0},
        {"upscale_step": 0},
        {"upscale_cooldown_s": -1},
        {"downscale_delay_s": -1},
        {"downscale_band": 1},
        {"downscale_band": 0},
    ],
)
def test_config_rejects_nonsense(kwargs):
    with pytest.raises(ValueError):
        PolicyConfig(**kwargs)


def test_state_dict_round_trip_ignores_serve_keys():
    state = PolicyState(low_since=5.0, last_scale_up_at=None)
    d = {**state.to_dict(), "__decision_counters": 3, "__decision_timestamp": 1.0}
    assert PolicyState.from_dict(d) == state
    assert PolicyState.from_dict({"low_since": "x", "last_scale_up_at": True}) == PolicyState()


# --- the Ray Serve adapter (Ray's context object built directly; no cluster) ---------------


@dataclass(frozen=True)
class _DeploymentID:
    """What the policy reads of Serve's DeploymentID (not in Ray's public API)."""

    name: str
    app_name: str


def _ctx(replica_signals, target, policy_state, now=T0, lo=1, hi=6, requests=0.0):
    from ray.serve.config import AutoscalingConfig, AutoscalingContext
    from ray.serve.request_router import ReplicaID

    dep = _DeploymentID(name="Router", app_name="moeserve")
    ids = [ReplicaID(unique_id=f"r{i}", deployment_id=dep) for i in range(len(replica_signals))]
    metrics: dict = {}
    for rid, sig in zip(ids, replica_signals, strict=True):
        for key, value in sig.to_stats().items():
            metrics.setdefault(key, {})[rid] = value
    return AutoscalingContext(
        deployment_id=dep,
        deployment_name=dep.name,
        app_name=dep.app_name,
        current_num_replicas=len(ids),
        target_num_replicas=target,
        running_replicas=ids,
        total_num_requests=requests,
        total_queued_requests=requests,
        aggregated_metrics=lambda: metrics,
        raw_metrics=None,
        capacity_adjusted_min_replicas=lo,
        capacity_adjusted_max_replicas=hi,
        policy_state=policy_state,
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=now,
        config=AutoscalingConfig(
            min_replicas=lo, max_replicas=hi, upscale_delay_s=0, downscale_delay_s=0
        ),
    )


def test_serve_policy_reads_replica_stats_and_policy_state():
    hot = [RouterSignals(waiting=20, running=10, kv_use=0.5, ttft_p90_ms=300)] * 2
    target, state = serve_policy(_ctx(hot, target=2, policy_state={}))
    # 40 waiting + 20 running at the default 32 per replica -> 2; +1 step wins.
    assert (target, state) == (3, {"low_since": None, "last_scale_up_at": T0})


def test_serve_policy_takes_bounds_from_the_context():
    hot = [RouterSignals(waiting=20, running=10, kv_use=0.5)] * 2
    assert serve_policy(_ctx(hot, target=2, policy_state={}, hi=2))[0] == 2


def test_serve_policy_steps_down_after_the_delay_in_its_state():
    quiet = [RouterSignals(waiting=0, running=1, kv_use=0.05)] * 3
    state = {"low_since": T0 - 300, "last_scale_up_at": None, "__decision_counters": 0}
    assert serve_policy(_ctx(quiet, target=3, policy_state=state)) == (
        2,
        {"low_since": T0, "last_scale_up_at": None},
    )


def test_serve_policy_under_serves_own_wrapper_with_neutral_delays():
    # Serve 2.60 wraps every custom policy (private `_apply_autoscaling_config`) with its delays
    # and scaling factors; with delays 0 and factors 1 our target passes through unchanged.
    from ray.serve.autoscaling_policy import _apply_autoscaling_config

    wrapped = _apply_autoscaling_config(serve_policy)
    hot = [RouterSignals(waiting=20, running=10, kv_use=0.5)] * 2
    target, state = wrapped(_ctx(hot, target=2, policy_state={}))
    assert target == 3
    assert state["last_scale_up_at"] == T0


def test_serve_policy_holds_without_a_clock():
    ctx = _ctx([RouterSignals(kv_use=0.99)], target=2, policy_state={"low_since": 1.0}, now=None)
    assert serve_policy(ctx) == (2, {"low_since": 1.0})


def test_serve_policy_scales_from_zero_on_requests_at_handles():
    assert serve_policy(_ctx([], target=0, policy_state={}, lo=0, requests=1.0))[0] == 1
    assert serve_policy(_ctx([], target=0, policy_state={}, lo=0, requests=0.0))[0] == 0


def test_policy_class_takes_its_thresholds_from_policy_kwargs():
    # What the builder deploys: Serve instantiates the class once with policy_kwargs.
    policy = ServePolicy(target_running_per_replica=4, max_waiting_per_replica=0)
    busy = [RouterSignals(waiting=6, running=4, kv_use=0.2)]
    target, state = policy(_ctx(busy, target=1, policy_state={}))
    assert target == 3 and state["last_scale_up_at"] == T0  # ceil((6 + 4) / 4)
    assert serve_policy(_ctx(busy, target=1, policy_state={}))[0] == 2  # defaults: 32 per replica
    with pytest.raises(ValueError):
        ServePolicy(kv_high=2)
