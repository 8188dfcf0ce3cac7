"""`Metrics`: the one recording API over a backend, and the process's current instance.

Callers name a catalog metric and give its labels; a wrong name or label set raises at once
(both backends would otherwise fail differently, or silently). Processes on Ray call
`use_ray_metrics()` once at start; everything else gets the in-process backend.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from serve_app.metrics.backends import Backend, LocalBackend, RayBackend
from serve_app.metrics.catalog import BY_NAME, CATALOG

ROLLOUT_STATES: tuple[str, ...] = (
    "idle",
    "progressing",
    "paused",
    "promoted",
    "rolled_back",
    "failed",
)  # = serve_app.rollout.state.PHASES (a test keeps them equal)


class Metrics:
    def __init__(self, backend: Backend):
        self.backend = backend
        self._instruments = {s.name: backend.instrument(s) for s in CATALOG}

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        """Add to a counter; zero or less is ignored (Ray refuses it, and it changes nothing)."""
        if value > 0:
            self._get(name, "counter", labels).inc(value, labels)

    def set(self, name: str, value: float, **labels: str) -> None:
        self._get(name, "gauge", labels).set(value, labels)

    def observe(self, name: str, value: float, **labels: str) -> None:
        self._get(name, "histogram", labels).observe(value, labels)

    def _get(self, name: str, kind: str, labels: Mapping[str, str]):
        spec = BY_NAME.get(name)
        if spec is None or spec.kind != kind:
            raise ValueError(f"{name} is not a {kind} of the metrics catalog")
        if set(labels) != set(spec.labels):
            raise ValueError(f"{name} takes labels {spec.labels}, got {tuple(labels)}")
        return self._instruments[name]

    # ---- rollouts: called by the rollout controller ---------------------------------------

    def record_rollout(
        self, app: str, weights: Mapping[str, float], state: str, step: int = 0
    ) -> None:
        """weights: version -> share of new traffic (0..1, or percent if any is above 1);
        step: the canary step (1-based), 0 when none is in progress."""
        if state not in ROLLOUT_STATES:
            raise ValueError(f"unknown rollout state {state!r}; one of {ROLLOUT_STATES}")
        scale = 100.0 if any(w > 1 for w in weights.values()) else 1.0
        for version, w in weights.items():
            self.set("moeserve_rollout_weight_ratio", w / scale, app=app, version=version)
        for s in ROLLOUT_STATES:
            self.set("moeserve_rollout_state", 1.0 if s == state else 0.0, app=app, state=s)
        self.set("moeserve_rollout_step", float(step), app=app)

    def record_rollback(self, app: str, reason: str) -> None:
        self.inc("moeserve_rollout_rollbacks_total", 1, app=app, reason=reason)


_lock = threading.Lock()
_current: Metrics | None = None


def get_metrics() -> Metrics:
    """This process's Metrics (the in-process backend unless use_ray_metrics() ran first)."""
    global _current
    with _lock:
        if _current is None:
            _current = Metrics(LocalBackend())
        return _current


def use_ray_metrics() -> Metrics:
    """Record through Ray's pipeline from now on (idempotent). Call in Ray workers only."""
    global _current
    with _lock:
        if _current is None or not isinstance(_current.backend, RayBackend):
            _current = Metrics(RayBackend())
        return _current
