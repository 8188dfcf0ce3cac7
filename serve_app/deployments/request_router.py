"""Serve adapter: the router deployment's request router under `router.routing:
prefix_affinity` (Ray Serve 2.60 RequestRouter; see serve_app.builder).

It runs inside every DeploymentHandle to one version's router deployment (so in each ingress
replica), after the rollout split chose that version: affinity is always among one version's
replicas. The ingress passes the request's RouteRequest as the `route` keyword of `generate`;
a call without one (health, info, a pow2 ingress) is placed by load alone and not counted in
moeserve_router_routed_requests_total.

Load per replica: the requests this handle has in flight there (exact, updated on routing and
completion), or Serve's queue-length cache when larger (other ingress replicas' requests); KV
use: the replica's `record_routing_stats` (Router), every request_routing_stats_period_s.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

from ray.serve._private.common import ReplicaID
from ray.serve._private.replica_result import ReplicaResult
from ray.serve._private.request_router.common import PendingRequest
from ray.serve._private.request_router.replica_wrapper import RunningReplica
from ray.serve._private.request_router.request_router import RequestRouter

from serve_app.metrics import get_metrics
from serve_app.routing.affinity import (
    AffinityConfig,
    AffinityState,
    ReplicaLoad,
    RouteRequest,
    choose_replica,
)

log = logging.getLogger(__name__)

ROUTED_METRIC = "moeserve_router_routed_requests_total"
KV_USE_STAT = "kv_use"
MAX_TRACKED_REQUESTS = 100_000


class PrefixAffinityRequestRouter(RequestRouter):
    def initialize_state(self, version: str = "", **affinity: Any) -> None:
        self._version = version
        self._state = AffinityState(AffinityConfig(**affinity))
        self._inflight: Counter[str] = Counter()  # this handle's requests per replica
        self._routed: dict[str, str] = {}  # internal request id -> replica

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        """The decision's replica first; the others as a second rank, tried when Serve finds
        the first one full (max_ongoing_requests).

        NOTE: the decision is recorded here, not in on_request_routed: Serve calls that hook
        only under its strict max_ongoing_requests mode. A second call for the same request
        (Serve retrying) moves its in-flight count to the new choice.
        """
        if not candidate_replicas:
            return []
        route = route_of(pending_request)
        counted = route is not None  # a generation request (not health, info, ...)
        if route is None:
            internal = pending_request.metadata.internal_request_id if pending_request else ""
            route = RouteRequest((), None, internal)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        loads = [ReplicaLoad(rid, self._load(r), _kv_use(r)) for rid, r in by_id.items()]
        now = time.monotonic()
        decision = choose_replica(route, loads, self._state, now)
        self._state.record(decision, route, now)
        if pending_request is not None:
            internal = pending_request.metadata.internal_request_id
            if self._release(internal) is None and counted:
                get_metrics().inc(ROUTED_METRIC, version=self._version, reason=decision.reason)
            self._hold(internal, decision.replica)
        chosen = by_id[decision.replica]
        rest = [r for r in candidate_replicas if r is not chosen]
        return [[chosen], rest] if rest else [[chosen]]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult
    ) -> None:
        internal = pending_request.metadata.internal_request_id
        if self._routed.get(internal) != replica_id.unique_id:  # Serve found ours full
            self._release(internal)
            self._hold(internal, replica_id.unique_id)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._release(internal_request_id)

    def _hold(self, internal: str, replica: str) -> None:
        if len(self._routed) >= MAX_TRACKED_REQUESTS:  # completions lost (cancelled early)
            self._routed.clear()
            self._inflight.clear()
        self._routed[internal] = replica
        self._inflight[replica] += 1

    def _release(self, internal: str) -> str | None:
        replica = self._routed.pop(internal, None)
        if replica is not None:
            self._inflight[replica] -= 1
            if self._inflight[replica] <= 0:
                del self._inflight[replica]
        return replica

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._state.retain([r.replica_id.unique_id for r in replicas])

    def _load(self, r: RunningReplica) -> int:
        cached = self._replica_queue_len_cache.get(r.replica_id) or 0
        return max(self._inflight[r.replica_id.unique_id], cached)


def route_of(pending_request: PendingRequest | None) -> RouteRequest | None:
    """The RouteRequest passed with the call (any argument); None for calls without one."""
    if pending_request is None:
        return None
    for value in (*pending_request.kwargs.values(), *pending_request.args):
        if isinstance(value, RouteRequest):
            return value
    return None


def _kv_use(r: RunningReplica) -> float | None:
    value = (r.routing_stats or {}).get(KV_USE_STAT)
    return float(value) if isinstance(value, int | float) else None
