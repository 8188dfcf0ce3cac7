"""The ingress's side of rollouts: which version serves a request, and how it went.

Every ingress replica polls the app's rollout controller (deployments/rollout_actor.py) for the
version split, picks a version per request with the pure sticky split (serve_app.rollout.split)
and reports each finished request's outcome back in small batches. When the controller is
briefly unreachable (restarting), the last table keeps serving.
"""

from __future__ import annotations

import asyncio
import logging

from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.api.adapter_rollouts import AdapterRollouts
from serve_app.api.client import RouteHint
from serve_app.engine.errors import InvalidRequestError
from serve_app.rollout.controller import VersionSplit
from serve_app.rollout.split import PIN_HEADER, choose_version
from serve_app.rollout.state import RolloutError
from serve_app.rollout.window import Outcome

log = logging.getLogger(__name__)

POLL_S = 0.5
FLUSH_S = 1.0
MAX_PENDING = 10_000


class TrafficSplit:
    """The ingress's traffic split between model versions (the router replicas of each)."""

    def __init__(
        self,
        base: str,
        base_handle: DeploymentHandle,
        controller,
        adapters: AdapterRollouts | None = None,
        served_adapters: dict[str, str] | None = None,
    ):
        """adapters: the front end's adapter splits, kept up to date from the controller;
        served_adapters: the LoRA adapters of the app's config, name -> directory."""
        self.base = base
        self.controller = controller
        self.adapters = adapters
        self.served_adapters = dict(served_adapters or {})
        self.split = VersionSplit(((base, 100),), {base: None}, base, -1)
        self._handles: dict[str, DeploymentHandle] = {base: base_handle}
        self._pending: list[list] = []
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._poll()), loop.create_task(self._flush())]

    @property
    def stable(self) -> str:
        return self.split.stable

    def choose(self, hint: RouteHint | None, request_key: str) -> str:
        hint = hint or RouteHint()
        try:
            return choose_version(self.split.weights, hint.session_key, request_key, hint.pinned)
        except RolloutError as e:
            raise InvalidRequestError(str(e), PIN_HEADER) from None

    def handle(self, version: str) -> DeploymentHandle:
        if version not in self._handles:
            app = self.split.apps[version]
            self._handles[version] = serve.get_deployment_handle("router", app_name=app)
        return self._handles[version]

    def report(self, outcome: Outcome) -> None:
        if len(self._pending) < MAX_PENDING:
            self._pending.append(outcome.to_list())

    async def refresh(self) -> None:
        split: VersionSplit = await self.controller.version_split.remote()
        if split.generation != self.split.generation:
            log.info("version split %s: %s", split.generation, split.weights)
            for name, app in split.apps.items():
                if app is not None and self.split.apps.get(name) != app:
                    self._handles.pop(name, None)
        self.split = split
        if self.adapters is not None:
            splits = await self.controller.adapter_splits.remote(self.served_adapters)
            self.adapters.update(splits)

    async def _poll(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.refresh(), timeout=5)
            except Exception as e:  # noqa: BLE001 - keep the last split while it restarts
                log.warning("rollout controller unreachable, keeping the version split: %s", e)
            await asyncio.sleep(POLL_S)

    async def _flush(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            batch, self._pending = self._pending, []
            if self.adapters is not None:
                batch += self.adapters.take_outcomes()
            if not batch:
                continue
            try:
                await asyncio.wait_for(self.controller.record.remote(batch), timeout=5)
            except Exception as e:  # noqa: BLE001 - outcomes are best effort
                log.warning("dropped %d rollout outcomes: %s", len(batch), e)
