"""Serve adapter: replica picking for the router deployment under `router.routing:
prefix_affinity` (Ray Serve 2.60's public RequestRouter API; see serve_app.builder). The
picking itself is serve_app.replica_picking.picker.ReplicaPicker (pure).

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

import time
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from serve_app.metrics import get_metrics
from serve_app.replica_picking.affinity import AffinityConfig, ReplicaLoad, RouteRequest
from serve_app.replica_picking.picker import ReplicaPicker

ROUTED_METRIC = "moeserve_router_routed_requests_total"
KV_USE_STAT = "kv_use"


class PrefixAffinityReplicaPicker(RequestRouter):
    def initialize_state(self, version: str = "", **affinity: Any) -> None:
        self._version = version
        self.picker = ReplicaPicker(AffinityConfig(**affinity))

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
        internal = pending_request.metadata.internal_request_id if pending_request else None
        route = route_of(pending_request)
        counted = route is not None  # a generation request (not health, info, ...)
        if route is None:
            route = RouteRequest((), None, internal or "")
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        loads = [ReplicaLoad(rid, self._load(r), _kv_use(r)) for rid, r in by_id.items()]
        decision, first = self.picker.pick(route, loads, time.monotonic(), internal)
        if first and counted:
            get_metrics().inc(ROUTED_METRIC, version=self._version, reason=decision.reason)
        chosen = by_id[decision.replica]
        rest = [r for r in candidate_replicas if r is not chosen]
        return [[chosen], rest] if rest else [[chosen]]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: object
    ) -> None:
        self.picker.sent(pending_request.metadata.internal_request_id, replica_id.unique_id)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.picker.completed(internal_request_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self.picker.retain([r.replica_id.unique_id for r in replicas])

    def _load(self, r: RunningReplica) -> int:
        """This handle's requests in flight there (exact), or Serve's queue-length cache when
        larger (other ingress replicas' requests)."""
        cached = self.replica_queue_len_cache.get(r.replica_id) or 0
        return max(self.picker.inflight(r.replica_id.unique_id), cached)


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
