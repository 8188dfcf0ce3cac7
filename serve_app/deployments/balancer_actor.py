"""The expert balancer as a Ray actor: the thin adapter that runs serve_app.experts.balancer.

A deployment-scoped actor of the router deployment (serve_app.builder), so every router replica
shares it, it starts before them and goes with the app. Routers call `register` once before
they serve and `sync` every `sync_interval_s`; a daemon thread runs the loop every
`interval_s`: top up shards that lack experts, then the next move (load a plan's experts and
publish it, or drop once every router switched).

NOTE: `serve.get_deployment_actor` works only inside a replica, so the routers pass the shard
handles they resolve with each sync; the balancer acts with the latest ones and forgets a
handle whose actor died until a router sends the recreated one.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from serve_app.experts.balancer import Balancer, BalancerConfig, Drop, Versioned
from serve_app.experts.placement import Placement
from serve_app.experts.rebalance import RebalancePlan
from serve_app.messages import PlacementReport

log = logging.getLogger(__name__)

Shards = list[list[int]]  # the wire form of Placement.shards


@ray.remote
class ExpertBalancerActor:
    def __init__(self, num_experts: int, shards: Shards, config: BalancerConfig, timeout_s: float):
        placement = Placement(num_experts, tuple(tuple(s) for s in shards))
        self.balancer = Balancer(placement, config, time.monotonic())
        self.timeout_s = timeout_s  # longest wait for a shard's add / drop / info
        self._lock = threading.Lock()
        self._handles: list[Any] = [None] * placement.num_shards
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moeserve-balancer", daemon=True)
        self._thread.start()

    async def register(self, router: str) -> Versioned:
        """The placement a new router replica dispatches by before it serves."""
        with self._lock:
            return self.balancer.register(router, time.monotonic())

    async def sync(self, report: PlacementReport) -> Versioned:
        """A router's report; returns the placement it should dispatch by."""
        with self._lock:
            for s, h in enumerate(report.shard_handles):
                if h is not None:
                    self._handles[s] = h
            return self.balancer.report(
                report.router, report.expert_tokens, report.used, time.monotonic()
            )

    async def state(self) -> dict:
        """For tests and operators: the placement, its generation, and whether it drains."""
        with self._lock:
            current = self.balancer.current
            return {
                "generation": current.generation,
                "shards": [list(s) for s in current.placement.shards],
                "draining": self.balancer.draining,
            }

    def _run(self) -> None:
        while not self._stop.wait(self.balancer.config.interval_s):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the loop must outlive one failed move
                log.exception("expert balancer step failed; retrying next interval")

    def tick(self) -> None:
        handles = list(self._handles)
        held = self._call(handles, [("info", None)] * len(handles))
        with self._lock:
            missing = self.balancer.missing([None if h is None else h["owned"] for h in held])
        if any(missing):
            log.info("expert balancer: topping up shards with %s", missing)
            self._call(handles, [("add_experts", list(m)) if m else None for m in missing])
        with self._lock:
            move = self.balancer.step(time.monotonic())
        if isinstance(move, RebalancePlan):
            added = self._call(handles, [("add_experts", list(a)) for a in move.add])
            if any(a is None for a in added):
                return  # a shard did not load its experts: plan again next time
            with self._lock:
                now = self.balancer.publish(move, time.monotonic())
            log.info(
                "expert balancer: generation %d %s (imbalance %.2f -> %.2f)",
                now.generation,
                now.placement.shards,
                move.imbalance_before,
                move.imbalance_after,
            )
        elif isinstance(move, Drop):
            # A shard that misses the drop keeps spare weights (memory only, no wrong token).
            self._call(handles, [("drop_experts", list(d)) if d else None for d in move.experts])
            with self._lock:
                self.balancer.dropped()

    def _call(self, handles: list[Any], calls: list[tuple[str, Any] | None]) -> list[Any]:
        """One method call per shard (None: skip); a result, or None where it failed."""
        refs = [
            None
            if h is None or c is None
            else (getattr(h, c[0]).remote() if c[1] is None else getattr(h, c[0]).remote(c[1]))
            for h, c in zip(handles, calls, strict=True)
        ]
        out = []
        for s, ref in enumerate(refs):
            try:
                out.append(None if ref is None else ray.get(ref, timeout=self.timeout_s))
            except RayActorError:
                with self._lock:
                    if self._handles[s] is handles[s]:
                        self._handles[s] = None  # dead: wait for a router's fresh handle
                out.append(None)
            except GetTimeoutError:
                out.append(None)
        return out
