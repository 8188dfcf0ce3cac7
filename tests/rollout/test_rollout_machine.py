"""The rollout state machine: exact states after each event, with the clock passed in."""

import pytest

from serve_app.rollout.analysis import Verdict
from serve_app.rollout.machine import Abort, Pause, Promote, Resume, Start, Tick, Undo, step
from serve_app.rollout.state import (
    AnalysisConfig,
    HistoryEntry,
    RolloutError,
    RolloutState,
    Strategy,
    Version,
)

V1 = Version("v1", "/models/v1", "sha256:aaa")
V2 = Version("v2", "/models/v2")
V3 = Version("v3", "/models/v3")
CANARY = Strategy("canary", (5, 25, 50, 100), interval_s=60.0)
BLUEGREEN = Strategy("bluegreen", interval_s=30.0)
ANALYSIS = AnalysisConfig(scale_down_delay_s=300.0)
OK = Tick(Verdict("promote", "within thresholds"))
BAD = Tick(Verdict("rollback", "error rate 3.00% > 1.00%", breach=True))


def idle() -> RolloutState:
    return RolloutState.initial(V1, now=0.0, analysis=ANALYSIS)


def canary(strategy: Strategy = CANARY) -> RolloutState:
    return step(idle(), Start(V2, strategy), now=100.0)


def test_start_canary_puts_the_first_step_on_the_candidate_first():
    s = canary()
    assert s.phase == "progressing" and s.candidate == V2 and s.stable == V1
    assert s.weights == (("v2", 5), ("v1", 95))
    assert (s.step_index, s.step_started_at, s.reason) == (0, 100.0, "canary of v2 started at 5%")


def test_canary_steps_only_after_the_interval_with_a_promote_verdict():
    s = canary()
    s = step(s, OK, now=159.0)  # 59 s into a 60 s step
    assert s.weights == (("v2", 5), ("v1", 95))
    assert (s.last_verdict, s.reason) == ("hold", "promote verdict; step interval not over")
    s = step(s, Tick(Verdict("inconclusive", "10 requests < min_samples 50")), now=170.0)
    assert s.weights == (("v2", 5), ("v1", 95)) and s.last_verdict == "inconclusive"
    s = step(s, Tick(None), now=171.0)
    assert s.weights == (("v2", 5), ("v1", 95)) and s.reason == "no analysis"
    s = step(s, OK, now=171.0)
    assert s.weights == (("v2", 25), ("v1", 75))
    assert (s.step_index, s.step_started_at) == (1, 171.0)
    s = step(s, OK, now=231.0)
    assert s.weights == (("v2", 50), ("v1", 50)) and s.step_index == 2
    s = step(s, OK, now=291.0)
    assert s.phase == "promoted" and s.stable == V2 and s.candidate is None
    # the old version stays at 0% for the scale-down delay
    assert s.weights == (("v2", 100), ("v1", 0))
    assert (s.retiring, s.retire_at) == (V1, 591.0)
    assert s.history == (HistoryEntry(V1, 0.0), HistoryEntry(V2, 291.0))
    assert s.reason == "v2 promoted: step passed analysis"


def test_retiring_version_leaves_the_weights_after_the_delay():
    s = step(canary(), Promote(full=True), now=200.0)
    assert s.retire_at == 500.0
    assert step(s, Tick(), now=499.9) == s
    later = step(s, Tick(), now=500.0)
    assert later.weights == (("v2", 100),) and later.retiring is None and later.retire_at is None


def test_rollback_verdict_returns_to_stable_at_once():
    s = step(canary(), OK, now=160.0)  # at 25%, interval not over: rollback does not wait
    s = step(s, BAD, now=161.0)
    assert s.phase == "failed" and s.weights == (("v1", 100),)
    assert s.stable == V1 and s.candidate == V2  # kept for display
    assert (s.last_verdict, s.reason) == ("rollback", "v2: error rate 3.00% > 1.00%")
    assert s.history == (HistoryEntry(V1, 0.0),)
    # a new rollout may start after a failure
    assert step(s, Start(V3, CANARY), now=200.0).weights == (("v3", 5), ("v1", 95))


def test_breaches_below_the_limit_are_counted_and_reset_by_a_pass():
    breach = Tick(Verdict("hold", "error rate 2.00% > 1.00% (failure 1 of 3)", breach=True))
    s = step(canary(), breach, now=101.0)
    assert s.consecutive_failures == 1 and s.phase == "progressing"
    s = step(s, breach, now=102.0)
    assert s.consecutive_failures == 2
    s = step(s, Tick(Verdict("inconclusive", "few")), now=103.0)
    assert s.consecutive_failures == 2  # thin data neither passes nor fails
    s = step(s, OK, now=104.0)
    assert s.consecutive_failures == 0 and s.weights == (("v2", 5), ("v1", 95))


def test_pause_and_resume():
    s = step(canary(), Pause("looking at dashboards"), now=110.0)
    assert (s.phase, s.reason) == ("paused", "looking at dashboards")
    s = step(s, OK, now=500.0)  # paused: no stepping
    assert s.weights == (("v2", 5), ("v1", 95)) and s.phase == "paused"
    with pytest.raises(RolloutError, match="paused; resume it first"):
        step(s, Promote(), now=501.0)
    with pytest.raises(RolloutError, match="already paused"):
        step(s, Pause(), now=501.0)
    s = step(s, Resume(), now=600.0)
    assert (s.phase, s.step_started_at) == ("progressing", 600.0)  # the interval restarts
    assert step(s, OK, now=659.0).weights == (("v2", 5), ("v1", 95))
    assert step(s, OK, now=660.0).weights == (("v2", 25), ("v1", 75))


def test_paused_rollout_still_rolls_back():
    s = step(step(canary(), Pause(), now=110.0), BAD, now=111.0)
    assert s.phase == "failed" and s.weights == (("v1", 100),)


def test_manual_strategy_pauses_after_every_step():
    s = canary(Strategy("canary", (10, 100), interval_s=0.0, auto=False))
    assert s.weights == (("v2", 10), ("v1", 90))
    s = step(step(idle(), Start(V2, Strategy("canary", (10, 50, 100), 0.0, False)), 0.0), OK, 1.0)
    assert s.phase == "paused" and s.weights == (("v2", 50), ("v1", 50))
    assert s.reason == "step passed analysis; at 50%; resume to go on"
    s = step(step(s, Resume(), now=2.0), OK, now=2.0)
    assert s.phase == "promoted" and s.stable == V2


def test_manual_promote_one_step_or_all_the_way():
    s = step(canary(), Promote(), now=101.0)
    assert s.weights == (("v2", 25), ("v1", 75)) and s.step_started_at == 101.0
    assert s.reason == "step promoted by operator; at 25%"
    s = step(s, Promote(full=True), now=102.0)
    assert s.phase == "promoted" and s.weights == (("v2", 100), ("v1", 0))
    assert s.reason == "v2 promoted: promoted by operator"


def test_abort_returns_to_stable():
    s = step(step(canary(), OK, now=200.0), Abort(), now=201.0)
    assert s.phase == "rolled_back" and s.weights == (("v1", 100),)
    assert (s.stable, s.candidate, s.reason) == (V1, V2, "aborted by operator")


def test_undo_to_a_previous_version_from_history():
    s = step(step(canary(), Promote(full=True), now=200.0), Tick(), now=10_000.0)
    assert s.weights == (("v2", 100),)  # v1 has retired; undo still works (the adapter redeploys)
    u = step(s, Undo("v1"), now=10_001.0)
    assert u.phase == "rolled_back" and u.stable == V1  # the digest comes back from history
    assert u.weights == (("v1", 100), ("v2", 0)) and u.retiring == V2
    assert u.history[-1] == HistoryEntry(V1, 10_001.0) and u.reason == "undo to v1"


def test_bluegreen_preview_switch_and_instant_undo_within_the_delay():
    s = step(idle(), Start(V2, BLUEGREEN), now=100.0)
    assert s.weights == (("v2", 0), ("v1", 100))  # preview: reachable by pinning only
    assert step(s, OK, now=129.0).weights == (("v2", 0), ("v1", 100))
    s = step(s, OK, now=130.0)  # one switch, no intermediate steps
    assert s.phase == "promoted" and s.weights == (("v2", 100), ("v1", 0))
    assert (s.retiring, s.retire_at) == (V1, 430.0)
    u = step(s, Undo("v1"), now=200.0)
    assert u.weights == (("v1", 100), ("v2", 0)) and u.stable == V1 and u.retiring == V2


def test_bluegreen_manual_waits_for_promote():
    s = step(idle(), Start(V2, Strategy("bluegreen", interval_s=0.0, auto=False)), now=0.0)
    s = step(s, OK, now=1000.0)
    assert (
        s.weights == (("v2", 0), ("v1", 100)) and s.reason == "preview passed; waiting for promote"
    )
    s = step(s, Promote(full=False), now=1001.0)  # blue-green promote is always the full switch
    assert s.weights == (("v2", 100), ("v1", 0)) and s.phase == "promoted"


def test_zero_delay_drops_the_old_version_at_once():
    s = step(
        RolloutState.initial(V1, 0.0, AnalysisConfig(scale_down_delay_s=0)),
        Start(V2, BLUEGREEN),
        0.0,
    )
    s = step(s, Promote(), now=1.0)
    assert s.weights == (("v2", 100),) and s.retiring is None


def test_start_clears_the_undo_window():
    s = step(step(canary(), Promote(full=True), now=200.0), Start(V3, CANARY), now=201.0)
    assert s.weights == (("v3", 5), ("v2", 95)) and s.retiring is None


def test_error_cases():
    with pytest.raises(RolloutError, match="cannot start v3: the rollout of v2 is progressing"):
        step(canary(), Start(V3, CANARY), now=101.0)
    with pytest.raises(RolloutError, match="already the stable version"):
        step(idle(), Start(V1, CANARY), now=1.0)
    for event in (Promote(), Pause(), Abort()):
        with pytest.raises(RolloutError, match=r"no rollout in progress \(phase idle\)"):
            step(idle(), event, now=1.0)
    with pytest.raises(RolloutError, match="not paused"):
        step(canary(), Resume(), now=101.0)
    with pytest.raises(RolloutError, match="abort it first"):
        step(canary(), Undo("v1"), now=101.0)
    with pytest.raises(RolloutError, match=r"unknown version 'v9'; history has \['v1'\]"):
        step(idle(), Undo("v9"), now=1.0)
    with pytest.raises(RolloutError, match="already the stable version"):
        step(idle(), Undo("v1"), now=1.0)
    assert step(idle(), Tick(), now=5.0) == idle()  # ticks never fail


@pytest.mark.parametrize("steps", [(), (5, 5, 100), (25, 5, 100), (5, 50), (0, 100), (5, 101)])
def test_strategy_rejects_bad_steps(steps):
    with pytest.raises(ValueError):
        Strategy("canary", steps)


def test_state_invariants():
    with pytest.raises(ValueError, match="summing to 100"):
        RolloutState(V1, (("v1", 90),))
    with pytest.raises(ValueError, match="must be in the weights"):
        RolloutState(V1, (("v2", 100),))
    with pytest.raises(ValueError, match="twice"):
        RolloutState(V1, (("v1", 100), ("v1", 0)))
    with pytest.raises(ValueError):
        Version("", "/m")


def test_json_round_trip_of_every_phase():
    states = [idle(), canary(), step(canary(), Pause(), 110.0), step(canary(), BAD, 101.0)]
    states.append(step(canary(), Promote(full=True), 200.0))
    states.append(step(states[-1], Undo("v1"), 201.0))
    for s in states:
        text = s.to_json()
        assert RolloutState.from_json(text) == s
        assert '"schema": 1' in text


def test_json_refuses_an_unknown_schema():
    text = idle().to_json().replace('"schema": 1', '"schema": 2')
    with pytest.raises(ValueError, match="schema 2 is not 1"):
        RolloutState.from_json(text)
