"""ReplicaPicker: one handle's prefix-affine replica picking, with the requests it has in
flight per replica. Pure (no Ray): replicas are ids, their loads and the clock come in.

serve_app/deployments/replica_picker.py adapts it to Ray Serve's RequestRouter; the choice
itself is affinity.choose_replica.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

from serve_app.replica_picking import affinity
from serve_app.replica_picking.adapters import AdapterKey
from serve_app.replica_picking.affinity import Decision, ReplicaLoad, RouteRequest

MAX_TRACKED_REQUESTS = 100_000


class Picked(NamedTuple):
    decision: Decision
    first: bool  # the request's first pick (a retried one moves its in-flight count)


class ReplicaPicker:
    def __init__(self, config: affinity.AffinityConfig):
        self.state = affinity.AffinityState(config)
        self._inflight: Counter[str] = Counter()  # this handle's requests per replica
        self._routed: dict[str, str] = {}  # internal request id -> replica
        self._adapters: dict[str, AdapterKey] = {}  # internal request id -> its adapter

    def inflight(self, replica: str) -> int:
        return self._inflight[replica]

    def pick(
        self, route: RouteRequest, loads: Sequence[ReplicaLoad], now: float, internal: str | None
    ) -> Picked:
        """The replica for `route`, recorded in the affinity state; `internal` (the handle's
        request id; None: an untracked call) is counted in flight there."""
        decision = affinity.choose_replica(route, loads, self.state, now)
        self.state.record(decision, route, now)
        first = True
        if internal is not None:
            first = self.completed(internal) is None
            self._hold(internal, decision.replica)
            if route.adapter is not None:
                self._adapters[internal] = route.adapter
        return Picked(decision, first)

    def sent(self, internal: str, replica: str) -> None:
        """Serve sent the request to `replica` (another than picked when ours was full): it
        loads the request's adapter there."""
        if self._routed.get(internal) != replica:
            adapter = self._adapters.get(internal)
            self.completed(internal)
            self._hold(internal, replica)
            if adapter is not None:
                self._adapters[internal] = adapter
                self.state.adapters.record(replica, adapter)

    def completed(self, internal: str) -> str | None:
        """The request ended; the replica it was counted on, if any."""
        replica = self._routed.pop(internal, None)
        self._adapters.pop(internal, None)
        if replica is not None:
            self._inflight[replica] -= 1
            if self._inflight[replica] <= 0:
                del self._inflight[replica]
        return replica

    def retain(self, replicas: Sequence[str]) -> None:
        """Forget the affinity of replicas that left (scale-down, death)."""
        self.state.retain(replicas)

    @property
    def num_inflight(self) -> int:
        return len(self._routed)

    def _hold(self, internal: str, replica: str) -> None:
        if len(self._routed) >= MAX_TRACKED_REQUESTS:  # completions lost (cancelled early)
            self._routed.clear()
            self._inflight.clear()
            self._adapters.clear()
        self._routed[internal] = replica
        self._inflight[replica] += 1
