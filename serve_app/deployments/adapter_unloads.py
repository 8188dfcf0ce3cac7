"""Adapter unloads across a version's router replicas over Ray: the thin adapter around
serve_app.lora.unloads (the decisions, pure).

`AdapterUnloadsActor` holds the version's UnloadLog. It is a deployment-scoped actor of the
router deployment (version_app.py), so every replica of the version shares it, it starts
before them and goes with the app; it exists only where the deployment may run more than one
replica (`shares_unloads`). Each replica's `UnloadSync` (a daemon thread) posts the unloads it
took and reads the others' every SYNC_INTERVAL_S, and drops what they name from its engine.
So an admin unload reaches every replica within SYNC_INTERVAL_S plus one actor call
(docs/lora.md, "Unloading").
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import ray
from ray import serve
from ray.serve.config import DeploymentActorConfig

from serve_app.config import AppConfig
from serve_app.lora.unloads import Unload, UnloadFollower, UnloadLog, UnloadsSince

log = logging.getLogger(__name__)

UNLOADS_ACTOR_NAME = "adapter-unloads"
SYNC_INTERVAL_S = 1.0
CALL_TIMEOUT_S = 5.0


def shares_unloads(config: AppConfig) -> bool:
    """Whether the router deployment may run several replicas (so it needs the unload log)."""
    r = config.router
    return r.num_replicas > 1 or r.autoscaling is not None


def unloads_actor(config: AppConfig) -> list[DeploymentActorConfig]:
    """The unload log, no CPU reserved (a few small calls a second)."""
    if not shares_unloads(config):
        return []
    return [
        DeploymentActorConfig(
            name=UNLOADS_ACTOR_NAME,
            actor_class=AdapterUnloadsActor,
            init_args=(),
            actor_options={"num_cpus": 0},
        )
    ]


@ray.remote
class AdapterUnloadsActor:
    """The version's unload log (one thread: calls run one at a time)."""

    def __init__(self):
        self.log = UnloadLog(uuid.uuid4().hex)

    def record(self, unloads: list[Unload]) -> int:
        return self.log.record(unloads)

    def since(self, epoch: str | None, seq: int) -> UnloadsSince:
        return self.log.since(epoch, seq)


class UnloadSync:
    """A router replica's link to the unload log: `drop(unload)` removes it from the engine."""

    def __init__(
        self,
        drop: Callable[[Unload], object],
        resolve: Callable[[], Any] | None = None,
        interval_s: float = SYNC_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._drop = drop
        self._resolve = resolve or (lambda: serve.get_deployment_actor(UNLOADS_ACTOR_NAME))
        self.interval_s = interval_s
        self.clock = clock
        self.follower = UnloadFollower()
        self._actor: Any = None
        self._lock = threading.Lock()  # one sync at a time (the thread and an admin call)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moeserve-unloads", daemon=True)
        self._thread.start()

    def unload(self, unload: Unload) -> None:
        """An unload this replica took (and applied): post it to the log now, or at the next
        sync if the log does not answer."""
        with self._lock:
            self.follower.add(unload, self.clock())
        try:
            self.sync()
        except Exception as e:  # noqa: BLE001 - the thread posts it at its next sync
            log.warning("posting the unload of %s failed (%s); retrying", unload.name, e)

    def sync(self) -> None:
        with self._lock:
            try:
                actor = self._actor = self._actor or self._resolve()
                plan = self.follower.plan()
                if plan.post:
                    ray.get(actor.record.remote(list(plan.post)), timeout=CALL_TIMEOUT_S)
                    self.follower.posted(plan)
                answer = ray.get(actor.since.remote(plan.epoch, plan.seq), timeout=CALL_TIMEOUT_S)
            except Exception:
                self._actor = None  # e.g. being recreated: resolve it again next time
                raise
            now = self.clock()
            learned = self.follower.merge(answer, now)
            for u in self.follower.due(now):
                self._drop(u)
        for u in learned:
            log.info("LoRA adapter %s (revision <= %d) unloaded", u.name, u.revision)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sync()
            except Exception as e:  # noqa: BLE001 - the next interval tries again
                log.warning("adapter unload sync failed (%s); retrying", type(e).__name__)

    def stop(self) -> None:
        self._stop.set()
