"""Replica picking in-process: the pure ReplicaPicker (in-flight counts, exact state) and its
Serve adapter (PrefixAffinityReplicaPicker) over fake replicas and requests that have what
Ray's public RequestRouter API gives it; no Ray cluster. The decision itself:
test_replica_affinity.py."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from serve_app.deployments.replica_picker import PrefixAffinityReplicaPicker, route_of
from serve_app.engine.block_hash import root_hash
from serve_app.metrics import get_metrics
from serve_app.replica_picking.affinity import AffinityConfig, ReplicaLoad
from serve_app.replica_picking.key import HashNamespace, route_request
from serve_app.replica_picking.picker import ReplicaPicker

NS = HashNamespace(root_hash(0, "d"), 4, 64)


@dataclass(frozen=True)
class FakeReplicaID:
    unique_id: str


@dataclass
class FakeReplica:
    replica_id: FakeReplicaID
    routing_stats: dict = field(default_factory=dict)
    max_ongoing_requests: int = 100


def replica(name: str, kv: float | None = None) -> FakeReplica:
    return FakeReplica(FakeReplicaID(name), {} if kv is None else {"kv_use": kv})


def pending(internal: str, route=None) -> SimpleNamespace:
    """What the adapter reads of Serve's PendingRequest."""
    kwargs = {} if route is None else {"route": route}
    meta = SimpleNamespace(request_id=internal, internal_request_id=internal)
    return SimpleNamespace(args=[[1, 2, 3], None, internal], kwargs=kwargs, metadata=meta)


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


@pytest.fixture(autouse=True)
def _empty_queue_len_cache(monkeypatch):
    """Serve's queue-length cache (the base class's public property), empty: no other handle."""
    monkeypatch.setattr(PrefixAffinityReplicaPicker, "replica_queue_len_cache", {}, raising=False)


def make_router(**affinity) -> PrefixAffinityReplicaPicker:
    """The adapter without the base class's constructor (its Serve-internal arguments)."""
    r = PrefixAffinityReplicaPicker.__new__(PrefixAffinityReplicaPicker)
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
        assert router.picker.inflight(chosen.replica_id.unique_id) == 2
        # 2 in flight vs 0: cap = ceil(1.5 * 3 / 2) = 3, so a third still fits; a fourth not.
        await router.choose_replicas(reps, pending("3", p))
        fourth = await router.choose_replicas(reps, pending("4", p))
        assert fourth[0] == [other]
        for i in ("1", "2", "3", "4"):
            router.on_request_completed(chosen.replica_id, i)
        assert (
            router.picker.num_inflight == 0
            and router.picker.inflight(chosen.replica_id.unique_id) == 0
        )
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
        assert router.picker.state.owned == {"b": 3}
        router.picker.retain(["a"])  # b left (scale-down): what update_replicas does
        assert router.picker.state.owned == {} and not router.picker.state.blocks
        # A call without a route (health, info) is placed by load and not counted.
        assert (await router.choose_replicas([full], pending("2")))[0] == [full]

    before = routed_count("vtest", "no_match")
    asyncio.run(go())
    assert routed_count("vtest", "no_match") - before == 1


def test_picker_moves_a_request_serve_sent_elsewhere_and_counts_each_once():
    picker = ReplicaPicker(AffinityConfig(min_load=0))
    loads = [ReplicaLoad("a", 0, None), ReplicaLoad("b", 0, None)]
    route = route_request(list(range(12)), NS, None, "r")
    first = picker.pick(route, loads, 0.0, "1")
    assert first.first and picker.inflight(first.decision.replica) == 1
    other = "b" if first.decision.replica == "a" else "a"
    picker.sent("1", other)  # Serve found the picked replica full
    assert (picker.inflight(first.decision.replica), picker.inflight(other)) == (0, 1)
    again = picker.pick(route, loads, 1.0, "1")  # Serve retries the same request
    assert not again.first and picker.num_inflight == 1
    assert picker.completed("1") == again.decision.replica and picker.num_inflight == 0
    assert picker.completed("1") is None
    untracked = picker.pick(route, loads, 2.0, None)  # health, info: never held
    assert untracked.first and picker.num_inflight == 0


def test_an_adapter_request_serve_sent_elsewhere_is_resident_there():
    from serve_app.engine.outputs import LoraRef
    from serve_app.replica_picking.adapters import AdapterKey

    picker = ReplicaPicker(AffinityConfig(min_load=0))
    loads = [ReplicaLoad("a", 0, None), ReplicaLoad("b", 0, None)]
    route = route_request(list(range(12)), NS, None, "r", LoraRef("x", "/x", 3))
    picked = picker.pick(route, loads, 0.0, "1").decision.replica
    assert picker.state.adapters.holders(AdapterKey("x", 3)) == {picked}
    other = "b" if picked == "a" else "a"
    picker.sent("1", other)  # Serve found the picked replica full: `other` loads x
    assert picker.state.adapters.holders(AdapterKey("x", 3)) == {"a", "b"}
    picker.completed("1")
    assert picker.num_inflight == 0
