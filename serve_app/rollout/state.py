"""The rollout's data: versions, strategy, analysis thresholds and the state snapshot.

Everything here is a frozen dataclass; transitions (machine.py) build new snapshots. A snapshot
serialises to JSON with a schema version (never pickle) so a state store (Redis, a detached
actor) can hold it and a newer build can refuse a layout it does not know.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Literal

SCHEMA_VERSION = 1

StrategyKind = Literal["canary", "bluegreen"]
Phase = Literal["idle", "progressing", "paused", "promoted", "rolled_back", "failed"]
PHASES: tuple[str, ...] = ("idle", "progressing", "paused", "promoted", "rolled_back", "failed")
ACTIVE_PHASES: tuple[str, ...] = ("progressing", "paused")

# Ordered (version name, percent) pairs; the candidate comes first (see split.py for why).
Weights = tuple[tuple[str, int], ...]


class RolloutError(ValueError):
    """An event that does not apply to the current state (the message says why)."""


@dataclass(frozen=True, slots=True)
class Version:
    """A deployable model version. `digest` (serve_app.model.digest) pins the exact weights."""

    name: str
    model_path: str
    digest: str | None = None

    def __post_init__(self) -> None:
        if not self.name or self.name.strip() != self.name:
            raise ValueError(f"version name must be non-empty without spaces around: {self.name!r}")
        if not self.model_path:
            raise ValueError(f"version {self.name!r} needs a model path")


@dataclass(frozen=True, slots=True)
class Strategy:
    """How traffic moves to the candidate.

    canary: the candidate gets steps[0] percent, then each later step once the step has run for
      interval_s with a passing analysis; the last step must be 100.
    bluegreen: the candidate runs at 0% (reachable by the preview header only) and switches to
      100% in one move; `steps` is not used.
    auto: advance without a human. When False, a canary pauses after every step (resume to go
      on) and a blue-green preview waits for an explicit promote.
    """

    kind: StrategyKind = "canary"
    steps: tuple[int, ...] = (5, 25, 50, 100)
    interval_s: float = 300.0
    auto: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("canary", "bluegreen"):
            raise ValueError(f"strategy kind must be 'canary' or 'bluegreen', not {self.kind!r}")
        if not self.steps or any(not 0 < s <= 100 for s in self.steps):
            raise ValueError(f"steps must be percents in (0, 100], got {self.steps}")
        if any(b <= a for a, b in zip(self.steps, self.steps[1:], strict=False)):
            raise ValueError(f"steps must increase strictly, got {self.steps}")
        if self.steps[-1] != 100:
            raise ValueError(f"the last step must be 100, got {self.steps}")
        if self.interval_s < 0:
            raise ValueError(f"interval_s must be >= 0, got {self.interval_s}")


@dataclass(frozen=True, slots=True)
class AnalysisConfig:
    """Thresholds for the candidate's health over one analysis window (see analysis.py).

    interval_s: how often the controller runs the analysis (a bad candidate is rolled back
      within failure_limit intervals of its errors showing up).
    max_ratio_to_stable: when set, the candidate also fails if its error rate or a P99 latency is
      more than this many times the stable version's (stable needs min_samples requests).
    failure_limit: consecutive failed analyses before a rollback (1: the first failure).
    scale_down_delay_s: how long a replaced version stays deployed at 0% after a promotion or
      undo, so that undo within it is only a weight change.
    """

    interval_s: float = 10.0
    window_s: float = 60.0
    max_error_rate: float = 0.01
    max_ttft_p99_ms: float | None = 500.0
    max_e2e_p99_ms: float | None = None
    min_samples: int = 50
    failure_limit: int = 1
    max_ratio_to_stable: float | None = None
    scale_down_delay_s: float = 600.0

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {self.interval_s}")
        if self.window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {self.window_s}")
        if not 0 <= self.max_error_rate <= 1:
            raise ValueError(f"max_error_rate is a fraction in [0, 1], got {self.max_error_rate}")
        for name in ("max_ttft_p99_ms", "max_e2e_p99_ms"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0 or None, got {value}")
        if self.min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, got {self.min_samples}")
        if self.failure_limit < 1:
            raise ValueError(f"failure_limit must be >= 1, got {self.failure_limit}")
        if self.max_ratio_to_stable is not None and self.max_ratio_to_stable < 1:
            raise ValueError(f"max_ratio_to_stable must be >= 1, got {self.max_ratio_to_stable}")
        if self.scale_down_delay_s < 0:
            raise ValueError(f"scale_down_delay_s must be >= 0, got {self.scale_down_delay_s}")


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """`version` became the stable version at time `at` (the clock the caller passes in)."""

    version: Version
    at: float


@dataclass(frozen=True, slots=True)
class RolloutState:
    """One snapshot of a model's rollout.

    candidate: the version being rolled out; in "failed" / "rolled_back" after an abort, the one
      that was taken out (for display); None when idle or promoted.
    weights: percent per version, candidate first, summing to 100. A version at 0 is deployed
      and reachable by pinning but gets no split traffic (blue-green preview, retiring version).
    step_index: the canary step the weights are at (index into strategy.steps).
    step_started_at: when the current step began; a step advances once interval_s has passed.
    retiring / retire_at: the replaced version kept at 0% until retire_at (instant undo).
    """

    stable: Version
    weights: Weights
    phase: Phase = "idle"
    candidate: Version | None = None
    strategy: Strategy | None = None
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    step_index: int = 0
    step_started_at: float | None = None
    consecutive_failures: int = 0
    history: tuple[HistoryEntry, ...] = ()
    retiring: Version | None = None
    retire_at: float | None = None
    last_verdict: str | None = None
    reason: str = ""

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"unknown phase {self.phase!r}")
        names = [n for n, _ in self.weights]
        if len(set(names)) != len(names):
            raise ValueError(f"a version appears twice in weights {self.weights}")
        if (
            any(not 0 <= w <= 100 for _, w in self.weights)
            or sum(w for _, w in self.weights) != 100
        ):
            raise ValueError(f"weights must be percents summing to 100, got {self.weights}")
        if self.stable.name not in names:
            raise ValueError(f"the stable version {self.stable.name!r} must be in the weights")

    @classmethod
    def initial(
        cls, stable: Version, now: float, analysis: AnalysisConfig | None = None
    ) -> RolloutState:
        """A model serving `stable` alone, with no rollout."""
        return cls(
            stable=stable,
            weights=((stable.name, 100),),
            analysis=analysis or AnalysisConfig(),
            history=(HistoryEntry(stable, now),),
            reason=f"{stable.name} deployed",
        )

    @property
    def active(self) -> bool:
        """A rollout is in progress (progressing or paused)."""
        return self.phase in ACTIVE_PHASES

    def weight_map(self) -> dict[str, int]:
        return dict(self.weights)

    def evolve(self, **changes: Any) -> RolloutState:
        return replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(_state_to_dict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RolloutState:
        data = json.loads(text)
        schema = data.get("schema") if isinstance(data, dict) else None
        if schema != SCHEMA_VERSION:
            raise ValueError(f"rollout state schema {schema!r} is not {SCHEMA_VERSION}")
        return _state_from_dict(data)


def _version_to_dict(v: Version | None) -> dict[str, Any] | None:
    return None if v is None else {"name": v.name, "model_path": v.model_path, "digest": v.digest}


def _version_from_dict(d: dict[str, Any] | None) -> Version | None:
    return None if d is None else Version(d["name"], d["model_path"], d.get("digest"))


def _state_to_dict(s: RolloutState) -> dict[str, Any]:
    st = s.strategy
    return {
        "schema": SCHEMA_VERSION,
        "stable": _version_to_dict(s.stable),
        "weights": [[name, w] for name, w in s.weights],
        "phase": s.phase,
        "candidate": _version_to_dict(s.candidate),
        "strategy": None
        if st is None
        else {
            "kind": st.kind,
            "steps": list(st.steps),
            "interval_s": st.interval_s,
            "auto": st.auto,
        },
        "analysis": {
            name: getattr(s.analysis, name) for name in AnalysisConfig.__dataclass_fields__
        },
        "step_index": s.step_index,
        "step_started_at": s.step_started_at,
        "consecutive_failures": s.consecutive_failures,
        "history": [{"version": _version_to_dict(h.version), "at": h.at} for h in s.history],
        "retiring": _version_to_dict(s.retiring),
        "retire_at": s.retire_at,
        "last_verdict": s.last_verdict,
        "reason": s.reason,
    }


def _state_from_dict(d: dict[str, Any]) -> RolloutState:
    st = d["strategy"]
    return RolloutState(
        stable=_version_from_dict(d["stable"]),
        weights=tuple((str(name), int(w)) for name, w in d["weights"]),
        phase=d["phase"],
        candidate=_version_from_dict(d["candidate"]),
        strategy=None
        if st is None
        else Strategy(st["kind"], tuple(st["steps"]), st["interval_s"], st["auto"]),
        analysis=AnalysisConfig(**d["analysis"]),
        step_index=d["step_index"],
        step_started_at=d["step_started_at"],
        consecutive_failures=d["consecutive_failures"],
        history=tuple(
            HistoryEntry(_version_from_dict(h["version"]), h["at"]) for h in d["history"]
        ),
        retiring=_version_from_dict(d["retiring"]),
        retire_at=d["retire_at"],
        last_verdict=d["last_verdict"],
        reason=d["reason"],
    )
