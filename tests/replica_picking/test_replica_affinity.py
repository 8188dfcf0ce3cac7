"""serve_app.replica_picking.affinity: the replica choice, exact decisions on hand-built state."""

from __future__ import annotations

import pytest

from serve_app.engine.block_hash import root_hash
from serve_app.engine.kv_cache_manager import KVCacheManager
from serve_app.engine.outputs import LoraRef
from serve_app.engine.request import Request, SamplingParams
from serve_app.messages import RouterInfo
from serve_app.replica_picking.adapters import AdapterKey
from serve_app.replica_picking.affinity import (
    AffinityConfig,
    AffinityState,
    Decision,
    ReplicaLoad,
    RouteRequest,
    choose_replica,
    rendezvous,
    within_bound,
)
from serve_app.replica_picking.key import HashNamespace, route_request

BS = 4
NS = HashNamespace(root_hash(0, "digest-a"), BS, max_blocks=64)


def prompt(tag: int, blocks: int, session: str | None = None) -> RouteRequest:
    """A prompt of `blocks` full blocks whose tokens start with `tag` (distinct prefixes)."""
    ids = [tag * 1000 + i for i in range(blocks * BS)]
    return route_request(ids, NS, session, f"req-{tag}")


def loads(**kw: int | tuple[int, float]) -> list[ReplicaLoad]:
    out = []
    for name, v in kw.items():
        load, kv = v if isinstance(v, tuple) else (v, None)
        out.append(ReplicaLoad(name, load, kv))
    return out


def state(**cfg) -> AffinityState:
    return AffinityState(AffinityConfig(**cfg))


def send(st: AffinityState, req: RouteRequest, lds, now: float = 0.0) -> Decision:
    d = choose_replica(req, lds, st, now)
    st.record(d, req, now)
    return d


def test_route_key_is_the_engines_own_block_hashes():
    root = root_hash(0, "digest-a")
    ids = list(range(3 * BS + 2))  # 3 full blocks + 2 tokens
    req = Request("r", ids, SamplingParams(max_tokens=1), (), 1)
    KVCacheManager(8, BS, root).update_block_hashes(req)
    key = route_request(ids, HashNamespace(root, BS, 64), "s", "r")
    assert key.block_hashes == tuple(req.block_hashes) and len(key.block_hashes) == 3
    assert key.session_key == "s"
    # Only the leading max_blocks are hashed; another digest never matches.
    assert route_request(ids, HashNamespace(root, BS, 2), None, "r").block_hashes == tuple(
        req.block_hashes[:2]
    )
    other = route_request(ids, HashNamespace(root_hash(0, "digest-b"), BS, 64), None, "r")
    assert not set(other.block_hashes) & set(key.block_hashes)


def router_info(routing: str, block_size: int = 16, route_key_blocks: int = 8) -> RouterInfo:
    return RouterInfo(
        max_model_len=512,
        expert_parallel_size=0,
        node_id="n",
        digest="d",
        routing=routing,
        block_size=block_size,
        prefix_hash_seed=0,
        route_key_blocks=route_key_blocks,
    )


def test_namespace_from_router_info():
    assert HashNamespace.of_version(router_info("pow2")) is None
    ns = HashNamespace.of_version(router_info("prefix_affinity"))
    assert ns == HashNamespace(root_hash(0, "d"), 16, 8)


def test_unseen_prefix_goes_to_the_replica_holding_fewest_blocks_then_sticks():
    st = state()
    send(st, prompt(1, 3), loads(a=0, b=0))
    first = st.blocks[prompt(1, 3).block_hashes[0]]
    holder = next(iter(first))
    other = "b" if holder == "a" else "a"
    assert st.owned == {holder: 3}
    d = choose_replica(prompt(2, 2), loads(a=0, b=0), st, 0.0)
    assert d == Decision(other, "no_match", 0)
    # The first prompt again, and a longer one sharing its 3 blocks: its replica, by match.
    assert choose_replica(prompt(1, 3), loads(a=0, b=0), st, 0.0) == Decision(
        holder, "prefix_match", 3
    )
    longer = route_request([1000 + i for i in range(5 * BS)], NS, None, "x")
    assert choose_replica(longer, loads(a=0, b=0), st, 0.0) == Decision(holder, "prefix_match", 3)


def test_unseen_prefix_tie_is_broken_by_rendezvous_of_its_first_block():
    req = prompt(7, 2)
    expect = max(["a", "b", "c"], key=lambda r: -int.from_bytes(rendezvous(req.block_hashes[0], r)))
    assert choose_replica(req, loads(a=0, b=0, c=0), state(), 0.0) == Decision(
        expect, "no_match", 0
    )


def test_longest_match_wins_then_the_least_loaded_of_equals():
    st = state()
    full = prompt(1, 4)
    st.record(Decision("a", "no_match", 0), RouteRequest(full.block_hashes[:2]), 0.0)
    st.record(Decision("b", "no_match", 0), full, 0.0)
    assert st.match_depths(full.block_hashes) == {"a": 2, "b": 4}
    assert choose_replica(full, loads(a=0, b=1), st, 0.0) == Decision("b", "prefix_match", 4)
    st.record(Decision("a", "no_match", 0), full, 0.0)
    assert choose_replica(full, loads(a=1, b=0), st, 0.0) == Decision("b", "prefix_match", 4)
    assert choose_replica(full, loads(a=0, b=1), st, 0.0) == Decision("a", "prefix_match", 4)


def test_load_bound_is_relative_to_the_mean_above_min_load():
    cfg = AffinityConfig(load_factor=1.5, min_load=0)
    # 3 in flight, 2 replicas: cap = ceil(1.5 * 4 / 2) = 3, so a replica with 2 takes a third.
    assert within_bound(loads(a=2, b=1), cfg) == {"a", "b"}
    assert within_bound(loads(a=3, b=0), cfg) == {"b"}
    assert within_bound(loads(a=0, b=0, c=0), cfg) == {"a", "b", "c"}  # ceil: never 0
    assert within_bound(loads(a=5), cfg) == {"a"}  # one replica is never past the mean
    strict = AffinityConfig(load_factor=1.0, min_load=0)
    assert within_bound(loads(a=1, b=0), strict) == {"b"}
    # Under min_load in flight a replica is within the bound whatever the others carry.
    batching = AffinityConfig(load_factor=1.5, min_load=4)
    assert within_bound(loads(a=3, b=0), batching) == {"a", "b"}
    assert within_bound(loads(a=6, b=1), batching) == {"b"}  # cap = ceil(1.5 * 8 / 2) = 6


def test_preferred_replica_past_the_bound_falls_back_to_least_loaded():
    st = state(min_load=0)
    p = prompt(1, 3)
    st.record(Decision("a", "no_match", 0), p, 0.0)
    assert choose_replica(p, loads(a=2, b=1), st, 0.0) == Decision("a", "prefix_match", 3)
    assert choose_replica(p, loads(a=3, b=0, c=1), st, 0.0) == Decision("b", "load_fallback", 0)


def test_kv_use_past_max_counts_as_overloaded_unless_every_replica_is():
    st = state(max_kv_use=0.9)
    p = prompt(1, 3)
    st.record(Decision("a", "no_match", 0), p, 0.0)
    assert choose_replica(p, loads(a=(0, 0.95), b=(1, 0.5)), st, 0.0) == Decision(
        "b", "load_fallback", 0
    )
    assert choose_replica(p, loads(a=(0, 0.95), b=(0, 0.97)), st, 0.0) == Decision(
        "a", "prefix_match", 3
    )
    assert choose_replica(p, loads(a=(0, None), b=(0, 0.1)), st, 0.0).replica == "a"


def test_session_sticks_while_within_bound_and_expires():
    st = state(session_ttl_s=60, min_load=0)
    send(st, prompt(1, 2, session="s1"), loads(a=0, b=5))  # b is busy: a
    assert st.sessions["s1"] == ("a", 0.0)
    other = prompt(2, 3, session="s1")
    st.record(Decision("b", "no_match", 0), RouteRequest(other.block_hashes), 0.0)
    # The session beats b's prefix match while a is within the bound...
    assert choose_replica(other, loads(a=1, b=0), st, 10.0) == Decision("a", "session", 0)
    # ...not past it (least loaded instead), nor after the TTL (then: the prefix match).
    assert choose_replica(other, loads(a=4, b=0), st, 10.0) == Decision("b", "load_fallback", 3)
    assert choose_replica(other, loads(a=1, b=0), st, 61.0) == Decision("b", "prefix_match", 3)


def test_prompt_shorter_than_a_block_goes_to_the_least_loaded():
    st = state()
    st.record(Decision("a", "no_match", 0), prompt(1, 8), 0.0)  # a holds more blocks
    short = route_request([1, 2], NS, None, "r")
    assert short.block_hashes == ()
    assert choose_replica(short, loads(a=0, b=2), st, 0.0) == Decision("a", "no_match", 0)


def test_new_replica_takes_new_prefixes_and_old_ones_stay():
    st = state()
    for tag in range(4):
        send(st, prompt(tag, 2), loads(a=0, b=0))
    assert st.owned == {"a": 4, "b": 4}
    before = {tag: choose_replica(prompt(tag, 2), loads(a=0, b=0), st, 0.0) for tag in range(4)}
    three = loads(a=0, b=0, c=0)
    assert choose_replica(prompt(9, 2), three, st, 0.0) == Decision("c", "no_match", 0)
    for tag in range(4):
        assert choose_replica(prompt(tag, 2), three, st, 0.0) == before[tag]


def test_removed_replica_prefixes_move():
    st = state()
    p = prompt(1, 3)
    st.record(Decision("a", "no_match", 0), p, 0.0)
    st.record(Decision("b", "no_match", 0), prompt(2, 1), 0.0)
    st.record(Decision("c", "no_match", 0), prompt(3, 2), 0.0)
    st.sessions["s"] = ("a", 0.0)
    # a is gone: its prefix is unseen for the others (fewest blocks: b) ...
    assert choose_replica(p, loads(b=0, c=0), st, 0.0) == Decision("b", "no_match", 0)
    # ... and retain() drops what a held (blocks only it had, its sessions).
    st.retain(["b", "c"])
    assert st.owned == {"b": 1, "c": 2} and len(st.blocks) == 3 and "s" not in st.sessions
    assert st.match_depths(p.block_hashes) == {}


def test_block_table_is_lru_bounded_and_counts_stay_exact():
    st = state(max_tracked_blocks=4)
    send(st, prompt(1, 3), loads(a=0))
    send(st, prompt(2, 3), loads(a=0))
    assert len(st.blocks) == 4 and st.owned == {"a": 4}
    assert st.match_depths(prompt(1, 3).block_hashes) == {}  # its first blocks went first
    assert st.match_depths(prompt(2, 3).block_hashes) == {"a": 3}


def test_config_is_checked():
    with pytest.raises(ValueError, match="load_factor"):
        AffinityConfig(load_factor=0.5)
    with pytest.raises(ValueError, match="min_load"):
        AffinityConfig(min_load=-1)
    with pytest.raises(ValueError, match="max_kv_use"):
        AffinityConfig(max_kv_use=0)
    with pytest.raises(ValueError, match="no replica"):
        choose_replica(prompt(1, 1), [], state(), 0.0)


def _closed_loop(st: AffinityState, n: int, concurrency: int) -> tuple[list[Decision], int]:
    """One prefix sent n times by `concurrency` clients (oldest finishes first); returns the
    decisions and the most requests one replica ever held."""
    inflight: list[str] = []
    decisions, peak = [], 0
    for i in range(n):
        if len(inflight) == concurrency:
            inflight.pop(0)
        lds = [ReplicaLoad(r, inflight.count(r)) for r in ("a", "b")]
        d = send(st, prompt(1, 31), lds, float(i))
        inflight.append(d.replica)
        decisions.append(d)
        peak = max(peak, max(inflight.count(r) for r in ("a", "b")))
    return decisions, peak


def test_one_hot_prefix_is_spread_over_both_replicas_by_the_load_bound():
    # 8 clients. The first 4 requests fill a (under min_load); the 5th finds a past the bound
    # (cap = ceil(1.5 * 5 / 2) = 4) and goes to b. Both then hold the prefix, and every later
    # request takes the less loaded of the two: never more than 4 of the 8 on one replica.
    decisions, peak = _closed_loop(state(load_factor=1.5, min_load=4), 64, concurrency=8)
    per = {r: sum(d.replica == r for d in decisions) for r in ("a", "b")}
    assert min(per.values()) >= 16, per  # each replica takes at least a quarter
    assert peak == 4
    assert {d.reason for d in decisions} == {"no_match", "prefix_match", "load_fallback"}
    # Both replicas now hold the prefix: requests match on either (the least loaded).
    assert {d.replica for d in decisions if d.reason == "prefix_match"} == {"a", "b"}
    # Without a bound (a huge factor) the same traffic queues on one replica.
    unbounded, peak = _closed_loop(state(load_factor=100.0), 64, concurrency=8)
    assert len({d.replica for d in unbounded}) == 1 and peak == 8


class _Info:
    def __init__(self, info: RouterInfo | Exception):
        self.info, self.calls = info, 0

    async def remote(self):
        self.calls += 1
        if isinstance(self.info, Exception):
            raise self.info
        return self.info


class _Handle:
    def __init__(self, info: RouterInfo | Exception):
        self.info = _Info(info)


def test_route_keys_per_version_bad_ids_and_pow2_without_key():
    import asyncio

    from serve_app.replica_picking.key import RouteKeys

    affine = _Handle(router_info("prefix_affinity", BS, 64))
    pow2 = _Handle(router_info("pow2", BS, 64))
    broken = _Handle(RuntimeError("replica down"))
    keys = RouteKeys()
    ns = HashNamespace(root_hash(0, "d"), BS, 64)

    async def go():
        with_session = await keys.kwargs("v1", affine, list(range(20)), "s", "r1")
        assert with_session == {"route": route_request(list(range(20)), ns, "s", "r1")}
        ids = await keys.kwargs("v1", affine, list(range(9)), None, "r2")
        assert (
            ids["route"].block_hashes == route_request(list(range(9)), ns, None, "r2").block_hashes
        )
        lora = LoraRef("x", "/x", 2)  # the request's adapter rides in its key
        with_lora = await keys.kwargs("v1", affine, list(range(20)), None, "r8", lora)
        assert with_lora == {"route": route_request(list(range(20)), ns, None, "r8", lora)}
        assert with_lora["route"].adapter == AdapterKey("x", 2)
        assert await keys.kwargs("v1", affine, [1, -5, 3, 4], None, "r3") == {}
        assert await keys.kwargs("v2", pow2, list(range(9)), None, "r4") == {}
        assert await keys.kwargs("v2", pow2, list(range(9)), None, "r5") == {}
        assert await keys.kwargs("v3", broken, list(range(9)), None, "r6") == {}
        assert await keys.kwargs("v3", broken, list(range(9)), None, "r7") == {}

    asyncio.run(go())
    assert (affine.info.calls, pow2.info.calls, broken.info.calls) == (1, 1, 2)
