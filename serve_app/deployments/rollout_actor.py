"""The Ray side of the rollout controller: a detached named actor per Serve application.

Why a detached actor, checkpointed to Ray's GCS key-value store (the way Serve's own
controller keeps its state): every ingress replica and the CLI reach it by name, it outlives
the ingress replicas (killing one loses nothing), and when it dies Ray restarts it and it
reloads the last saved state. No Redis is needed for rollouts, so they work with the embedded
per-node Redis of the prefix cache, or with no prefix cache at all. With GCS fault tolerance
(KubeRay + external Redis) the state also survives a head restart.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import ray
from ray import serve

from serve_app.config import AppConfig
from serve_app.engine.outputs import LoraRef
from serve_app.metrics import Metrics, use_ray_metrics
from serve_app.rollout.adapter import AdapterSplit, internal_name
from serve_app.rollout.adapter_controllers import AdapterControllers
from serve_app.rollout.controller import RolloutController, VersionSplit
from serve_app.rollout.deploy_wait import AppSnapshot, deploy_verdict
from serve_app.rollout.state import AnalysisConfig, RolloutError, Strategy, Version
from serve_app.rollout.window import Outcome

log = logging.getLogger(__name__)

NAMESPACE = "moeserve"
TICK_FLOOR_S = 0.2
DEPLOY_POLL_S = 0.5


def controller_name(app: str) -> str:
    return f"rollout:{app}"


def version_app_name(app: str, version: str) -> str:
    """The Serve application of a non-base version of `app`."""
    return f"{app}--{version}"


class GcsStateStore:
    """The controller's JSON document in Ray's GCS key-value store."""

    def __init__(self, app: str, suffix: str = ""):
        self.key = (controller_name(app) + (f"/{suffix}" if suffix else "")).encode()

    def load(self) -> str | None:
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(self.key, namespace=NAMESPACE)
        return raw.decode() if raw else None

    def save(self, text: str) -> None:
        from ray.experimental.internal_kv import _internal_kv_put

        _internal_kv_put(self.key, text.encode(), overwrite=True, namespace=NAMESPACE)


class ServeDeployer:
    """Each non-base version is its own Serve application (router deployment + expert shards,
    no HTTP route), reached by the ingress through a handle.

    deploy() waits for the app in a bounded loop (deploy_wait.deploy_verdict) that cancel()
    ends from another thread: `rollout abort` while a candidate's replicas are pending."""

    def __init__(self, app: str):
        self.app = app
        self.pending: str | None = None  # the version being deployed, if any
        self._cancel = threading.Event()

    def app_name(self, version: str) -> str:
        return version_app_name(self.app, version)

    def deploy(self, version: str, config: dict[str, Any]) -> str | None:
        # NOTE: imported here, not at the top: the version app pulls in the router (torch, the
        # engine), which the controller actor and the ingress that creates it never need
        # unless a version is deployed. Not a cycle: version_app imports nothing of this module.
        from serve_app.deployments.version_app import build_version_app

        timeout_s = AppConfig.model_validate(config).rollout.deploy_timeout_s
        app = build_version_app(config)
        name = self.app_name(version)
        self._cancel.clear()
        self.pending = version
        try:
            # NOTE: serve.run() waits until the app runs, for ever when no node can place a
            # replica; Serve 2.60's _run(_blocking=False) returns at once and we poll instead.
            router = serve._run(app, name=name, route_prefix=None, _blocking=False)
            t0 = time.monotonic()
            while True:
                if self._cancel.is_set():
                    raise RolloutError("aborted by the operator while its replicas were pending")
                verdict = deploy_verdict(_snapshot(name), time.monotonic() - t0, timeout_s)
                if verdict.ready:
                    break
                if verdict.error:
                    raise RolloutError(verdict.error)
                self._cancel.wait(DEPLOY_POLL_S)
        finally:
            self.pending = None
        return router.info.remote().result(timeout_s=60).digest

    def cancel(self) -> str | None:
        """Stop a deploy in progress (its app is then deleted); the version, or None."""
        pending = self.pending
        if pending is not None:
            self._cancel.set()
        return pending

    def delete(self, version: str) -> None:
        serve.delete(self.app_name(version), _blocking=False)


class AdapterDeployer:
    """An adapter version needs no replicas of its own: "deploying" it loads it under its
    internal name on one router replica of the base app, which checks it (a bad directory
    fails the start before any traffic); the other replicas load it from its path on their
    first request for it. delete() does nothing: engines evict unused adapters (LRU)."""

    def __init__(self, app: str, public: str):
        self.app, self.public = app, public

    def app_name(self, version: str) -> str:
        return internal_name(self.public, version)

    def deploy(self, version: str, config: dict[str, Any]) -> str | None:
        router = serve.get_deployment_handle("router", app_name=self.app)
        ref = LoraRef(self.app_name(version), str(config["model"]), 0)
        error = router.load_adapter.remote(ref).result(timeout_s=120)
        if error is not None:
            raise RolloutError(f"adapter {ref.path}: {error}")
        return None

    def delete(self, version: str) -> None:
        pass


def _snapshot(name: str) -> AppSnapshot | None:
    app = serve.status().applications.get(name)
    if app is None:
        return None
    return AppSnapshot(
        getattr(app.status, "value", str(app.status)),
        app.message or "",
        tuple(d.message or "" for d in app.deployments.values()),
    )


def adapter_rollout_label(app: str, adapter: str) -> str:
    """The `app` label of an adapter's rollout series."""
    return f"{app}:{adapter}"


def publish_rollout(
    metrics: Metrics, label: str, ctl: RolloutController, reported: dict[str, dict[str, int]]
) -> None:
    """Weights and phase as gauges (re-sent each interval: Ray drops silent gauges), and the
    rollbacks since the last call as counter increments; `reported` keeps what was counted per
    label (a label not in it: none yet)."""
    s = ctl.state
    canary = s.active and s.strategy is not None and s.strategy.kind == "canary"
    metrics.record_rollout(label, s.weight_map(), s.phase, s.step_index + 1 if canary else 0)
    seen = reported.get(label, {})
    for reason, n in ctl.rollbacks.items():
        for _ in range(n - seen.get(reason, 0)):
            metrics.record_rollback(label, reason)
    reported[label] = dict(ctl.rollbacks)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class RolloutControllerActor:
    """Serialises every state change; runs the analysis every analysis.interval_s."""

    def __init__(self, app: str, base: dict[str, Any]):
        self.app = app
        self.deployer = ServeDeployer(app)
        self.ctl = RolloutController(Version(**base), GcsStateStore(app), self.deployer)
        self.adapters = AdapterControllers(
            lambda key: GcsStateStore(app, key), lambda public: AdapterDeployer(app, public)
        )
        self.lock = asyncio.Lock()
        self.loop_task: asyncio.Task | None = None
        self.metrics = use_ray_metrics()
        # per `app` label: the rollbacks counted so far (those restored: by an earlier process)
        self.reported = {self.app: dict(self.ctl.rollbacks)} | {
            adapter_rollout_label(app, name): dict(ctl.rollbacks)
            for name, ctl in self.adapters.controllers.items()
        }

    def _publish(self) -> None:
        """Each rollout's gauges, the model's under the app's name and each adapter's under
        `<app>:<adapter>` (docs/lora.md, "Adapter rollouts")."""
        try:
            publish_rollout(self.metrics, self.app, self.ctl, self.reported)
            for name, ctl in list(self.adapters.controllers.items()):
                publish_rollout(self.metrics, adapter_rollout_label(self.app, name), ctl,
                                self.reported)  # fmt: skip
        except Exception:  # noqa: BLE001 - metrics never stop a rollout
            log.exception("rollout metrics failed")

    def _ensure_loop(self) -> None:
        if self.loop_task is None or self.loop_task.done():
            self.loop_task = asyncio.get_running_loop().create_task(self._analysis_loop())

    async def _analysis_loop(self) -> None:
        model_ticked = time.monotonic()
        while True:
            # each rollout (the model's, every adapter's) analyses at its own interval
            interval = self.ctl.state.analysis.interval_s
            await asyncio.sleep(max(TICK_FLOOR_S, min(interval, self.adapters.min_interval())))
            try:
                async with self.lock:
                    if time.monotonic() - model_ticked >= interval - TICK_FLOOR_S / 2:
                        model_ticked = time.monotonic()
                        await asyncio.to_thread(self.ctl.tick)
                    await asyncio.to_thread(self.adapters.tick)
                    self._publish()
            except Exception:  # noqa: BLE001 - keep analysing; the next tick retries
                log.exception("rollout analysis tick failed")

    async def _event(self, method: str, *args, adapter: str | None = None) -> dict[str, Any]:
        """Run an operator event (a RolloutController method) on the model's controller, or
        on an adapter's."""
        self._ensure_loop()
        async with self.lock:
            try:
                # an adapter without a rollout raises RolloutError here
                ctl = self.ctl if adapter is None else self.adapters.get(adapter)
                await asyncio.to_thread(getattr(ctl, method), *args)
            except RolloutError as e:
                return {"error": str(e)}
            finally:
                self._publish()
        return self.ctl.status() if adapter is None else self.adapters.status(adapter)

    # ---- ingress --------------------------------------------------------------------------

    async def ensure_base(self, base: dict[str, Any]) -> None:
        async with self.lock:
            await asyncio.to_thread(self.ctl.ensure_base, Version(**base))

    async def version_split(self) -> VersionSplit:
        self._ensure_loop()
        return self.ctl.version_split()

    async def record(self, outcomes: list[list]) -> None:
        items = [Outcome.from_list(o) for o in outcomes]
        self.ctl.record([o for o in items if o.target is None])
        self.adapters.record([o for o in items if o.target is not None])

    async def adapter_splits(self, served: dict[str, str]) -> dict[str, AdapterSplit]:
        """The splits of the adapters under a rollout. served: the adapters the ingress's
        config serves, name -> directory (the stable side of a first adapter rollout); sent on
        every poll, so a restarted controller knows them again."""
        self.adapters.register(served)
        return self.adapters.splits()

    # ---- operator (the CLI) ---------------------------------------------------------------

    async def status(self, adapter: str | None = None) -> dict[str, Any]:
        """The controller's status, and the version being deployed (not yet in the state);
        with `adapter`, that adapter's rollout."""
        self._ensure_loop()
        if adapter is not None:
            try:
                return self.adapters.status(adapter)
            except RolloutError as e:
                return {"error": str(e)}
        return {**self.ctl.status(), "deploying": self.deployer.pending}

    async def start_adapter(
        self,
        adapter: str,
        version: str,
        config: dict,
        strategy: dict,
        analysis: dict | None,
        stable_path: str | None = None,
    ) -> dict[str, Any]:
        """Roll adapter `adapter` out to the directory config["model"] (rollout/adapter.py)."""
        self._ensure_loop()
        async with self.lock:
            try:
                await asyncio.to_thread(
                    self.adapters.start,
                    adapter,
                    version,
                    config,
                    Strategy(**{**strategy, "steps": tuple(strategy["steps"])}),
                    AnalysisConfig(**analysis) if analysis else None,
                    stable_path,
                )
            except RolloutError as e:
                return {"error": str(e)}
        return self.adapters.status(adapter)

    async def start(
        self, version: str, config: dict, strategy: dict, analysis: dict | None
    ) -> dict[str, Any]:
        return await self._event(
            "start",
            version,
            config,
            Strategy(**{**strategy, "steps": tuple(strategy["steps"])}),
            AnalysisConfig(**analysis) if analysis else None,
        )

    async def promote(self, full: bool = False, adapter: str | None = None) -> dict[str, Any]:
        return await self._event("promote", full, adapter=adapter)

    async def pause(self, adapter: str | None = None) -> dict[str, Any]:
        return await self._event("pause", adapter=adapter)

    async def resume(self, adapter: str | None = None) -> dict[str, Any]:
        return await self._event("resume", adapter=adapter)

    async def abort(self, adapter: str | None = None) -> dict[str, Any]:
        """All traffic back to stable; while a candidate is still being deployed (its start
        holds the lock), that deploy is stopped and its app deleted instead."""
        if adapter is not None:
            return await self._event("abort", adapter=adapter)
        cancelled = self.deployer.cancel()
        if cancelled is None:
            return await self._event("abort")
        async with self.lock:  # the start() that deployed it has unwound
            pass
        return {**self.ctl.status(), "deploying": None, "cancelled": cancelled}

    async def undo(
        self, to_version: str | None = None, adapter: str | None = None
    ) -> dict[str, Any]:
        return await self._event("undo", to_version, adapter=adapter)

    async def tick(self, adapter: str | None = None) -> dict[str, Any]:
        """One analysis now (tests and `rollout status --analyze`)."""
        return await self._event("tick", adapter=adapter)


def get_or_create_controller(app: str, base: Version):
    """The app's controller, created detached on first use (by the app's ingress), and the ref
    of its base registration (await it before routing)."""
    spec = {"name": base.name, "model_path": base.model_path, "digest": base.digest}
    actor = RolloutControllerActor.options(
        name=controller_name(app), namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote(app, spec)
    return actor, actor.ensure_base.remote(spec)


def get_controller(app: str):
    """The running controller of `app`, or a clear error when its app was never deployed."""
    try:
        return ray.get_actor(controller_name(app), namespace=NAMESPACE)
    except ValueError:
        raise RolloutError(
            f"no moeserve app {app!r} on this cluster (its rollout controller is not running); "
            "deploy it first, or pass --app"
        ) from None
