"""The Serve adapter (PrefixAffinityRequestRouter) in-process: fake replicas, real Serve
request objects, no Ray cluster. The decision itself: test_routing_affinity.py."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families
from ray.serve._private.common import (
    DeploymentHandleSource,
    DeploymentID,
    ReplicaID,
    RequestMetadata,
)
from ray.serve._private.request_router.common import PendingRequest

from serve_app.deployments.request_router import PrefixAffinityRequestRouter, route_of
from serve_app.engine.block_hash import root_hash
from serve_app.metrics import get_metrics
from serve_app.routing.key import HashNamespace, route_request

DEP = DeploymentID(name="router", app_name="app")
NS = HashNamespace(root_hash(0, "d"), 4, 64)


@dataclass
class FakeReplica:
    replica_id: ReplicaID
    routing_stats: dict = field(default_factory=dict)
    max_ongoing_requests: int = 100


def replica(name: str, kv: float | None = None) -> FakeReplica:
    return FakeReplica(ReplicaID(name, DEP), {} if kv is None else {"kv_use": kv})


def pending(internal: str, route=None) -> PendingRequest:
    kwargs = {} if route is None else {"route": route}
    meta = RequestMetadata(request_id=internal, internal_request_id=internal)
    return PendingRequest(args=[[1, 2, 3], None, internal], kwargs=kwargs, metadata=meta)


def routed_count(version: str, reason: str) -> float:
    text = asyncio.run(get_metrics().backend.exposition())
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith("moeserve_router_routed_requests") and s.labels == {
                "version": version,
                "reason": reason,
            }:
                return s.value
    return 0.0


def make_router(**affinity) -> PrefixAffinityRequestRouter:
    r = PrefixAffinityRequestRouter(DEP, DeploymentHandleSource.UNKNOWN)
    r.initialize_state(version="vtest", **affinity)
    return r


def test_route_is_found_in_any_argument_and_absent_for_other_calls():
    async def go():  # a PendingRequest holds a future: it needs a running loop
        route = route_request(list(range(8)), NS, None, "r")
        assert route_of(pending("a", route)) is route
        args_only = pending("b")
        args_only.args.append(route)
        assert route_of(args_only) is route
        assert route_of(pending("c")) is None and route_of(None) is None

    asyncio.run(go())


def test_prefix_sticks_load_is_counted_and_released():
    async def go():
        router = make_router(min_load=0)
        a, b = replica("a"), replica("b")
        reps = [a, b]
        p = route_request(list(range(12)), NS, None, "r")
        first = await router.choose_replicas(reps, pending("1", p))
        chosen = first[0][0]
        other = b if chosen is a else a
        assert first == [[chosen], [other]]
        # The same prefix again: the same replica (1 in flight there, within the bound).
        again = await router.choose_replicas(reps, pending("2", p))
        assert again[0] == [chosen]
        assert router._inflight == {chosen.replica_id.unique_id: 2}
        # 2 in flight vs 0: cap = ceil(1.5 * 3 / 2) = 3, so a third still fits; a fourth not.
        await router.choose_replicas(reps, pending("3", p))
        fourth = await router.choose_replicas(reps, pending("4", p))
        assert fourth[0] == [other]
        for i in ("1", "2", "3", "4"):
            router.on_request_completed(chosen.replica_id, i)
        assert not router._inflight and not router._routed
        return chosen

    before = {r: routed_count("vtest", r) for r in ("no_match", "prefix_match", "load_fallback")}
    asyncio.run(go())
    after = {r: routed_count("vtest", r) for r in before}
    assert {r: after[r] - before[r] for r in before} == {
        "no_match": 1,
        "prefix_match": 2,
        "load_fallback": 1,
    }


def test_kv_use_from_routing_stats_and_removed_replicas_are_forgotten():
    async def go():
        router = make_router()
        p = route_request(list(range(12)), NS, None, "r")
        full, roomy = replica("a", kv=0.99), replica("b", kv=0.2)
        assert (await router.choose_replicas([full, roomy], pending("1", p)))[0] == [roomy]
        assert router._state.owned == {"b": 3}
        router.update_replicas([full])  # b left (scale-down)
        assert router._state.owned == {} and not router._state.blocks
        # A call without a route (health, info) is placed by load and not counted.
        assert (await router.choose_replicas([full], pending("2")))[0] == [full]

    before = routed_count("vtest", "no_match")
    asyncio.run(go())
    assert routed_count("vtest", "no_match") - before == 1
