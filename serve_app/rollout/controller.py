"""The rollout controller: the one owner of a model's rollout state. Plain Python.

It applies operator events (start, promote, pause, resume, abort, undo) and the periodic
analysis tick through the pure `machine.step`, keeps the versions' deployments in line with the
state (deploy a candidate before it gets traffic, delete a version RETIRE_GRACE_S after nothing
routes to it),
persists every new state before anyone can read it, and answers the ingress's `version_split()`.
Ray, Serve and the state store are behind the two small interfaces below, so the logic runs in
unit tests with in-memory fakes; `actor.py` is the Ray adapter.

The base version is the one the Serve application itself was deployed with (the ingress's own
router deployment): it has no separate app, and is never deleted by the controller.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from serve_app.rollout.analysis import VersionMetrics, analyze
from serve_app.rollout.machine import Abort, Event, Pause, Promote, Resume, Start, Tick, Undo, step
from serve_app.rollout.state import AnalysisConfig, RolloutError, RolloutState, Strategy, Version
from serve_app.rollout.window import Outcome, OutcomeWindow

DOC_SCHEMA = 1
# A version that leaves the version split keeps its app this long (deleted on a later tick): an
# ingress replica routes with the table of its last poll, and a request sent to a deleted app
# waits for replicas that never come (Serve handles queue until a replica appears).
RETIRE_GRACE_S = 20.0


class Deployer(Protocol):
    """Creates and removes the Serve application of a non-base version."""

    def app_name(self, version: str) -> str: ...

    def deploy(self, version: str, config: dict[str, Any]) -> str | None:
        """Deploy (or update) the version's routers; return once they serve, with the model
        digest they report (serve_app.model.digest), raise if they do not start."""
        ...

    def delete(self, version: str) -> None: ...


class StateStore(Protocol):
    """Where the controller's document lives between restarts (JSON text, never pickle)."""

    def load(self) -> str | None: ...

    def save(self, text: str) -> None: ...


@dataclass(frozen=True, slots=True)
class VersionSplit:
    """What the ingress needs per request (the controller actor sends it as is): weights
    (candidate first) and each version's Serve app (None: the base app's own router)."""

    weights: tuple[tuple[str, int], ...]
    apps: dict[str, str | None]
    stable: str
    generation: int


class RolloutController:
    def __init__(
        self,
        base: Version,
        store: StateStore,
        deployer: Deployer,
        clock: Callable[[], float] = time.time,
    ):
        """`base` is used when the store is empty; a saved document keeps its own base (a
        restarted controller gets its first constructor arguments again), see ensure_base."""
        self.store = store
        self.deployer = deployer
        self.clock = clock
        self.configs: dict[str, dict[str, Any]] = {}
        self.rollbacks: dict[str, int] = {}
        self.generation = 0
        self.retired: dict[str, float] = {}  # version -> when it left the version split
        self.analyses = 0  # analyses of the current rollout (this process's count)
        self.base = base
        self.state = self._restore()
        self.window = OutcomeWindow(horizon_s=self.state.analysis.window_s)

    def ensure_base(self, base: Version) -> None:
        """The base app (re)started with `base`. Another version than the saved one means the
        base app was redeployed: the old rollout is over, its version apps are deleted."""
        if base.name == self.base.name:
            return
        for name in (_deployed(self.state) | set(self.retired)) - {self.base.name}:
            self.deployer.delete(name)
        self.retired = {}
        self.base, self.configs, self.generation = base, {}, self.generation + 1
        self.state = RolloutState.initial(base, self.clock())
        self._save()

    # ---- operator events -------------------------------------------------------------------

    def start(
        self,
        version: str,
        config: dict[str, Any],
        strategy: Strategy,
        analysis: AnalysisConfig | None = None,
    ) -> RolloutState:
        """Validate against the state, deploy the candidate, then give it its first weight."""
        candidate = Version(version, str(config.get("model", "")))
        if any(h.version.name == version for h in self.state.history):
            raise RolloutError(f"version {version!r} was already deployed once; use a new name")
        event = Start(candidate, strategy, analysis)
        step(self.state, event, self.clock())  # refuse before deploying anything
        try:
            digest = self.deployer.deploy(version, config)
        except Exception as e:  # noqa: BLE001 - whatever Serve raised, the candidate is out
            self.deployer.delete(version)
            raise RolloutError(f"deploying {version} failed: {e}") from e
        event = Start(Version(version, candidate.model_path, digest), strategy, analysis)
        self.configs[version] = config
        self.window.clear(version)
        self.analyses = 0
        return self._apply(event)

    def promote(self, full: bool = False) -> RolloutState:
        return self._apply(Promote(full))

    def pause(self) -> RolloutState:
        return self._apply(Pause())

    def resume(self) -> RolloutState:
        return self._apply(Resume())

    def abort(self) -> RolloutState:
        return self._apply(Abort())

    def undo(self, to_version: str | None = None) -> RolloutState:
        """Back to `to_version`, default the stable before the current one."""
        target = to_version or self._previous_stable()
        step(self.state, Undo(target), self.clock())  # refuse unknown versions before deploying
        if target not in self.state.weight_map() and target != self.base.name:
            self.deployer.deploy(target, self.configs[target])
        return self._apply(Undo(target))

    # ---- the ingress's side ----------------------------------------------------------------

    def record(self, outcomes: list[Outcome]) -> None:
        now = self.clock()
        for o in outcomes:
            self.window.add(o, now)

    def tick(self) -> RolloutState:
        """One analysis: the candidate's window against the thresholds, then the machine; and
        the deletion of versions retired RETIRE_GRACE_S ago."""
        self._reap()
        s = self.state
        if not s.active:
            return self._apply(Tick(None)) if s.retiring is not None else s
        self.analyses += 1
        verdict = analyze(
            self.metrics(s.candidate.name),
            s.analysis,
            self.metrics(s.stable.name),
            s.consecutive_failures,
        )
        return self._apply(Tick(verdict))

    def version_split(self) -> VersionSplit:
        s = self.state
        apps = {name: self._app(name) for name, _ in s.weights}
        return VersionSplit(s.weights, apps, s.stable.name, self.generation)

    def metrics(self, version: str) -> VersionMetrics:
        return self.window.metrics(version, self.clock(), self.state.analysis.window_s)

    def status(self) -> dict[str, Any]:
        s = self.state
        names = [n for n, _ in s.weights]
        if s.candidate is not None and s.candidate.name not in names:
            names.append(s.candidate.name)
        metrics = {}
        for name in names:
            m = self.metrics(name)
            metrics[name] = {
                "requests": m.requests,
                "errors": m.errors,
                "error_rate": m.error_rate,
                "ttft_p99_ms": m.ttft_p99_ms,
                "e2e_p99_ms": m.e2e_p99_ms,
            }
        return {
            "state": json.loads(s.to_json()),
            "metrics": metrics,
            "apps": {name: self._app(name) for name in names},
            "rollbacks": dict(self.rollbacks),
            "base": self.base.name,
            "analyses": self.analyses,
        }

    # ---- internals -------------------------------------------------------------------------

    def _apply(self, event: Event) -> RolloutState:
        old = self.state
        new = step(old, event, self.clock())
        if new == old:
            return old
        if old.active and new.phase in ("failed", "rolled_back"):
            kind = _rollback_kind(new.reason) if new.phase == "failed" else "manual"
            self.rollbacks[kind] = self.rollbacks.get(kind, 0) + 1
        self.state = new
        self.generation += 1
        now = self.clock()
        for name in _deployed(old) - _deployed(new) - {self.base.name}:
            self.retired.setdefault(name, now)
        for name in _deployed(new):
            self.retired.pop(name, None)
        self._save()
        return new

    def _reap(self) -> None:
        now = self.clock()
        due = [n for n, since in self.retired.items() if now - since >= RETIRE_GRACE_S]
        for name in due:
            self.deployer.delete(name)
            del self.retired[name]
        if due:
            self._save()

    def _app(self, version: str) -> str | None:
        return None if version == self.base.name else self.deployer.app_name(version)

    def _previous_stable(self) -> str:
        names = [h.version.name for h in self.state.history]
        current = self.state.stable.name
        earlier = [n for n in names[:-1] if n != current]
        if not earlier:
            raise RolloutError("nothing to undo: no earlier version in the history")
        return earlier[-1]

    def _restore(self) -> RolloutState:
        text = self.store.load()
        doc = json.loads(text) if text else None
        if doc and doc.get("schema") == DOC_SCHEMA:
            self.base = Version(**doc["base"])
            self.configs = doc["configs"]
            self.rollbacks = doc["rollbacks"]
            self.generation = doc["generation"]
            self.retired = doc.get("retired", {})
            return RolloutState.from_json(doc["state"])
        self.state = RolloutState.initial(self.base, self.clock())
        self._save()
        return self.state

    def _save(self) -> None:
        doc = {
            "schema": DOC_SCHEMA,
            "base": {
                "name": self.base.name,
                "model_path": self.base.model_path,
                "digest": self.base.digest,
            },
            "state": self.state.to_json(),
            "configs": self.configs,
            "rollbacks": self.rollbacks,
            "generation": self.generation,
            "retired": self.retired,
        }
        self.store.save(json.dumps(doc, sort_keys=True))


def _deployed(s: RolloutState) -> set[str]:
    """Versions that must keep a deployment: every weighted one, and an active candidate."""
    names = {n for n, _ in s.weights}
    if s.active and s.candidate is not None:
        names.add(s.candidate.name)
    return names


def _rollback_kind(reason: str) -> str:
    """The fixed `reason` label of the rollback counter."""
    if "error rate" in reason:
        return "error_rate"
    if "P99" in reason:
        return "latency"
    return "other"
