"""The rollout state machine: `step(state, event, now) -> state`, a pure function.

Phases: idle -> (start) progressing <-> paused -> promoted | failed | rolled_back; a new start
is allowed from any phase but progressing / paused. `now` is the caller's clock (seconds).

- Tick(verdict): the controller's periodic call with the latest analysis verdict.
  progressing: rollback -> failed at once (100% stable); promote once the step has run
  interval_s -> next canary step, or the blue-green switch when strategy.auto; anything else
  holds. paused: only a rollback acts (safety does not pause). Otherwise: retires the replaced
  version once retire_at has passed.
- Pause / Resume: freeze / unfreeze stepping; resume restarts the step's interval.
- Promote(full): a manual step (canary), all the way (full, or any blue-green promote).
- Abort: back to 100% stable -> rolled_back.
- Undo(to_version): outside a rollout, make a version from history stable again -> rolled_back.
After a promotion or undo the replaced version stays in the weights at 0% for
analysis.scale_down_delay_s (retiring), so undoing within that delay is only a weight change.
"""

from __future__ import annotations

from dataclasses import dataclass

from serve_app.rollout.analysis import Verdict
from serve_app.rollout.state import (
    AnalysisConfig,
    HistoryEntry,
    RolloutError,
    RolloutState,
    Strategy,
    Version,
)


@dataclass(frozen=True, slots=True)
class Start:
    candidate: Version
    strategy: Strategy
    analysis: AnalysisConfig | None = None  # None: keep the state's


@dataclass(frozen=True, slots=True)
class Tick:
    verdict: Verdict | None = None  # None: no analysis this time (treated as inconclusive)


@dataclass(frozen=True, slots=True)
class Pause:
    reason: str = "paused by operator"


@dataclass(frozen=True, slots=True)
class Resume:
    pass


@dataclass(frozen=True, slots=True)
class Promote:
    full: bool = False


@dataclass(frozen=True, slots=True)
class Abort:
    reason: str = "aborted by operator"


@dataclass(frozen=True, slots=True)
class Undo:
    to_version: str


Event = Start | Tick | Pause | Resume | Promote | Abort | Undo


def step(state: RolloutState, event: Event, now: float) -> RolloutState:
    """The state after `event` at time `now`; raises RolloutError when it does not apply."""
    if isinstance(event, Start):
        return _start(state, event, now)
    if isinstance(event, Tick):
        return _tick(state, event.verdict, now)
    if isinstance(event, Pause):
        if state.phase == "paused":
            raise RolloutError("cannot pause: the rollout is already paused")
        _require_progressing(state, "pause")
        return state.evolve(phase="paused", reason=event.reason)
    if isinstance(event, Resume):
        if state.phase != "paused":
            raise RolloutError(f"cannot resume: the rollout is {state.phase}, not paused")
        return state.evolve(phase="progressing", step_started_at=now, reason="resumed")
    if isinstance(event, Promote):
        _require_progressing(state, "promote")
        if state.strategy.kind == "bluegreen" or event.full:
            return _finish(state, now, "promoted by operator")
        return _advance(state, now, "step promoted by operator")
    if isinstance(event, Abort):
        if not state.active:
            raise RolloutError(f"cannot abort: no rollout in progress (phase {state.phase})")
        return _back_to_stable(state, "rolled_back", event.reason)
    if isinstance(event, Undo):
        return _undo(state, event.to_version, now)
    raise TypeError(f"not a rollout event: {event!r}")


def _require_progressing(state: RolloutState, what: str) -> None:
    if state.phase == "paused":
        raise RolloutError(f"cannot {what}: the rollout is paused; resume it first")
    if state.phase != "progressing":
        raise RolloutError(f"cannot {what}: no rollout in progress (phase {state.phase})")


def _start(state: RolloutState, event: Start, now: float) -> RolloutState:
    cand, strategy = event.candidate, event.strategy
    if state.active:
        raise RolloutError(
            f"cannot start {cand.name}: the rollout of {state.candidate.name} is {state.phase}"
        )
    if cand.name == state.stable.name:
        raise RolloutError(f"{cand.name} is already the stable version")
    # NOTE: a start ends the previous undo window: the retiring version leaves the weights.
    first = 0 if strategy.kind == "bluegreen" else strategy.steps[0]
    return state.evolve(
        phase="progressing",
        candidate=cand,
        strategy=strategy,
        analysis=event.analysis or state.analysis,
        weights=((cand.name, first), (state.stable.name, 100 - first)),
        step_index=0,
        step_started_at=now,
        consecutive_failures=0,
        retiring=None,
        retire_at=None,
        last_verdict=None,
        reason=f"{strategy.kind} of {cand.name} started at {first}%",
    )


def _tick(state: RolloutState, verdict: Verdict | None, now: float) -> RolloutState:
    if not state.active:
        if state.retiring is not None and now >= state.retire_at:
            return state.evolve(
                weights=tuple((n, w) for n, w in state.weights if n != state.retiring.name),
                retiring=None,
                retire_at=None,
            )
        return state
    verdict = verdict or Verdict("inconclusive", "no analysis")
    failures = state.consecutive_failures
    if verdict.breach:
        failures += 1
    elif verdict.kind == "promote":
        failures = 0
    state = state.evolve(
        consecutive_failures=failures, last_verdict=verdict.kind, reason=verdict.reason
    )
    if verdict.kind == "rollback":
        return _back_to_stable(state, "failed", f"{state.candidate.name}: {verdict.reason}")
    if state.phase == "paused" or verdict.kind != "promote":
        return state
    if now - state.step_started_at < state.strategy.interval_s:
        return state.evolve(last_verdict="hold", reason="promote verdict; step interval not over")
    if state.strategy.kind == "bluegreen":
        if not state.strategy.auto:
            return state.evolve(last_verdict="hold", reason="preview passed; waiting for promote")
        return _finish(state, now, "preview passed analysis")
    return _advance(state, now, "step passed analysis")


def _advance(state: RolloutState, now: float, reason: str) -> RolloutState:
    """The next canary step (or the finish when it is the 100% step)."""
    index = state.step_index + 1
    weight = state.strategy.steps[index]
    if weight == 100:
        return _finish(state, now, reason)
    paused = not state.strategy.auto
    return state.evolve(
        weights=((state.candidate.name, weight), (state.stable.name, 100 - weight)),
        step_index=index,
        step_started_at=now,
        phase="paused" if paused else "progressing",
        reason=f"{reason}; at {weight}%" + ("; resume to go on" if paused else ""),
    )


def _replace_stable(
    state: RolloutState, new: Version, now: float, phase: str, reason: str
) -> RolloutState:
    """`new` takes 100%; the old stable stays at 0% for scale_down_delay_s (instant undo)."""
    old, delay = state.stable, state.analysis.scale_down_delay_s
    keep = delay > 0
    return state.evolve(
        stable=new,
        weights=((new.name, 100), (old.name, 0)) if keep else ((new.name, 100),),
        phase=phase,
        history=(*state.history, HistoryEntry(new, now)),
        retiring=old if keep else None,
        retire_at=now + delay if keep else None,
        consecutive_failures=0,
        reason=reason,
    )


def _finish(state: RolloutState, now: float, reason: str) -> RolloutState:
    new = state.candidate
    done = _replace_stable(state, new, now, "promoted", f"{new.name} promoted: {reason}")
    return done.evolve(candidate=None, step_index=len(state.strategy.steps) - 1)


def _back_to_stable(state: RolloutState, phase: str, reason: str) -> RolloutState:
    """All traffic to the stable version; the candidate is kept in the state for display."""
    return state.evolve(phase=phase, weights=((state.stable.name, 100),), reason=reason)


def _undo(state: RolloutState, to_version: str, now: float) -> RolloutState:
    if state.active:
        raise RolloutError(f"cannot undo during a rollout ({state.phase}); abort it first")
    if to_version == state.stable.name:
        raise RolloutError(f"{to_version} is already the stable version")
    target = next(
        (h.version for h in reversed(state.history) if h.version.name == to_version), None
    )
    if target is None:
        known = sorted({h.version.name for h in state.history})
        raise RolloutError(f"unknown version {to_version!r}; history has {known}")
    return _replace_stable(state, target, now, "rolled_back", f"undo to {to_version}").evolve(
        candidate=None
    )
