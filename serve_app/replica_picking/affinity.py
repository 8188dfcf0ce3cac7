"""Prefix-affine replica choice with a load bound. Pure: state, loads and the clock come in.

A request is described by the chained block hashes of its prompt (serve_app.engine.block_hash,
namespaced by the model digest: the very keys of the replicas' prefix caches), its session key
and its LoRA adapter, if any. AffinityState remembers, per block hash, which replicas were sent
a prompt holding that block (LRU, bounded), per session key the replica of the conversation,
and per replica the adapters sent there (adapters.AdapterResidency). choose_replica then
picks, in this order:

1. session: the session's replica, while it is within the load bound;
2. prefix_match: among replicas holding the longest tracked prefix (>= min_match_blocks), the
   least loaded one within the bound. An adapter request's hashes chain from a root of its
   adapter (replica_picking/key.py), so a prefix match implies the adapter was sent there too;
3. adapter_match: a request with an adapter (no usable session or prefix replica) goes to the
   least loaded within-bound replica where the adapter is resident;
4. load_fallback: when 1, 2 or 3 found a replica but every preferred one is past the bound,
   the least loaded replica overall (it then holds the prefix or adapter too: a hot one spreads);
5. no_match: a base-model prompt shorter than a block goes to the least loaded replica; an
   unseen prefix goes to the within-bound replica that holds the fewest tracked blocks (a new
   replica therefore takes new prefixes first), then the least loaded, then a rendezvous hash
   of the prefix (the same on every ingress replica). For an adapter resident nowhere, the
   fewest resident adapters comes first: N adapters spread N / replicas per replica, so each
   fits in its replica's max_loras and none is evicted by the others.

The load bound ("bounded loads", Mirrokni et al. 2018): a replica with `load` requests in
flight takes one more while load + 1 <= ceil(load_factor * (total + 1) / n), or while
load < min_load (a few requests batch together at little cost, and moving one costs its whole
prefill), and while its KV-cache use is at most max_kv_use, unless every replica is past
max_kv_use. With no replica within the bound, the least loaded one is taken.

NOTE: replicas are compared only among `replicas` as given; entries of a replica that left
(scale-down, death) are ignored at once and purged by AffinityState.retain, so its prefixes
are placed again as unseen ones (they move).
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from serve_app.replica_picking.adapters import AdapterKey, AdapterResidency

Reason = Literal["session", "prefix_match", "adapter_match", "load_fallback", "no_match"]


@dataclass(frozen=True, slots=True)
class AffinityConfig:
    load_factor: float = 1.5  # bounded-load factor c >= 1 (1 = strict balance)
    min_load: int = 4  # fewer requests in flight than this are never past the bound
    max_kv_use: float = 0.9  # a replica fuller than this is past the bound (if another is not)
    min_match_blocks: int = 1  # shorter tracked matches count as no match
    max_tracked_blocks: int = 65_536  # LRU bound of the block table (all replicas together)
    max_sessions: int = 65_536
    session_ttl_s: float = 600.0  # a session silent this long is placed afresh
    max_loras: int = 8  # adapters a replica holds (its lora.max_loras): the LRU replayed here

    def __post_init__(self) -> None:
        if self.load_factor < 1:
            raise ValueError(f"load_factor must be >= 1, got {self.load_factor}")
        if not 0 < self.max_kv_use <= 1:
            raise ValueError(f"max_kv_use must be in (0, 1], got {self.max_kv_use}")
        if self.min_load < 0:
            raise ValueError(f"min_load must be >= 0, got {self.min_load}")
        for name in ("min_match_blocks", "max_tracked_blocks", "max_sessions", "max_loras"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.session_ttl_s <= 0:
            raise ValueError(f"session_ttl_s must be > 0, got {self.session_ttl_s}")


@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    replica: str
    load: int  # requests in flight (running + queued)
    kv_use: float | None = None  # KV-cache blocks in use / total; None: not known yet


@dataclass(frozen=True, slots=True)
class RouteRequest:
    block_hashes: tuple[bytes, ...]  # chained hashes of the prompt's full blocks
    session_key: str | None = None  # `user` field or x-session-id header
    request_key: str = ""  # places a request with neither hashes nor session
    adapter: AdapterKey | None = None  # the LoRA adapter it runs; None: the base model


@dataclass(frozen=True, slots=True)
class Decision:
    replica: str
    reason: Reason
    matched_blocks: int  # of the chosen replica (tracked, not necessarily still cached)
    adapter_resident: bool = False  # the request's adapter was believed held there


class AffinityState:
    """What one ingress remembers: block hash -> replicas, session -> replica (both LRU),
    replica -> adapters (the replicas' own LRU, replayed)."""

    def __init__(self, config: AffinityConfig):
        self.config = config
        self.blocks: OrderedDict[bytes, set[str]] = OrderedDict()
        self.sessions: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self.owned: Counter[str] = Counter()  # tracked blocks per replica
        self.adapters = AdapterResidency(config.max_loras)

    def match_depths(self, block_hashes: Sequence[bytes]) -> dict[str, int]:
        """Per replica, how many leading blocks of the prompt it was sent (chained hashes: a
        replica holding block i was sent blocks 0..i)."""
        depths: dict[str, int] = {}
        for i, h in enumerate(block_hashes):
            owners = self.blocks.get(h)
            if not owners:
                break
            for r in owners:
                depths[r] = i + 1
        return depths

    def session(self, key: str | None, now: float) -> str | None:
        entry = self.sessions.get(key) if key else None
        if entry is None or now - entry[1] > self.config.session_ttl_s:
            return None
        return entry[0]

    def record(self, decision: Decision, request: RouteRequest, now: float) -> None:
        """The request went to decision.replica: it now holds the prompt's blocks (and its
        adapter)."""
        r = decision.replica
        if request.adapter is not None:
            self.adapters.record(r, request.adapter)
        for h in request.block_hashes:
            owners = self.blocks.get(h)
            if owners is None:
                owners = self.blocks[h] = set()
            else:
                self.blocks.move_to_end(h)
            if r not in owners:
                owners.add(r)
                self.owned[r] += 1
        while len(self.blocks) > self.config.max_tracked_blocks:
            _, owners = self.blocks.popitem(last=False)
            for o in owners:
                self._disown(o)
        if request.session_key:
            self.sessions[request.session_key] = (r, now)
            self.sessions.move_to_end(request.session_key)
            while len(self.sessions) > self.config.max_sessions:
                self.sessions.popitem(last=False)

    def retain(self, replicas: Sequence[str]) -> None:
        """Forget replicas that are gone (their prefixes are placed again when seen)."""
        keep = set(replicas)
        self.adapters.retain(replicas)
        gone = [r for r in self.owned if r not in keep]
        if not gone:
            return
        for h in list(self.blocks):
            owners = self.blocks[h]
            owners.intersection_update(keep)
            if not owners:
                del self.blocks[h]
        for r in gone:
            del self.owned[r]
        for key in [k for k, (r, _) in self.sessions.items() if r not in keep]:
            del self.sessions[key]

    def _disown(self, r: str) -> None:
        self.owned[r] -= 1
        if self.owned[r] <= 0:
            del self.owned[r]


def within_bound(loads: Sequence[ReplicaLoad], config: AffinityConfig) -> set[str]:
    """Replicas that may take one more request (see the module docstring)."""
    if not loads:
        return set()
    total = sum(r.load for r in loads)
    cap = math.ceil(config.load_factor * (total + 1) / len(loads))
    ok = {r.replica for r in loads if r.load < config.min_load or r.load + 1 <= cap}
    roomy = {r.replica for r in loads if r.kv_use is None or r.kv_use <= config.max_kv_use}
    return ok & roomy if roomy else ok


def rendezvous(key: bytes | str, replica: str) -> bytes:
    """Highest-random-weight rank of a replica for a key: the same on every process."""
    k = key if isinstance(key, bytes) else key.encode()
    return hashlib.sha256(k + b"\0" + replica.encode()).digest()


def choose_replica(
    request: RouteRequest,
    loads: Sequence[ReplicaLoad],
    state: AffinityState,
    now: float,
) -> Decision:
    """The replica for `request` among `loads` (non-empty). Does not change `state`: the
    caller records the decision once the request is sent (AffinityState.record)."""
    if not loads:
        raise ValueError("no replica to choose from")
    by_id = {r.replica: r for r in loads}
    ok = within_bound(loads, state.config)
    key = _placement_key(request)
    adapter = request.adapter
    holders = state.adapters.holders(adapter) & by_id.keys() if adapter else set()

    def least_loaded(ids) -> str:
        return min(ids, key=lambda r: (by_id[r].load, by_id[r].kv_use or 0.0, rendezvous(key, r)))

    depths = {r: d for r, d in state.match_depths(request.block_hashes).items() if r in by_id}

    def decide(r: str, reason: Reason, matched: int | None = None) -> Decision:
        depth = depths.get(r, 0) if matched is None else matched
        return Decision(r, reason, depth, r in holders)

    def fallback() -> Decision:
        near = holders & ok  # the adapter's replicas within the bound, before any other
        if near:
            return decide(least_loaded(near), "adapter_match")
        return decide(least_loaded(ok or by_id), "load_fallback")

    session = state.session(request.session_key, now)
    if session in by_id:
        return decide(session, "session") if session in ok else fallback()
    best = max(depths.values(), default=0)
    if best >= state.config.min_match_blocks:
        top = [r for r, d in depths.items() if d == best and r in ok]
        return decide(least_loaded(top), "prefix_match", best) if top else fallback()
    if holders:
        return fallback()
    if not request.block_hashes and adapter is None:  # nothing to place: plain least loaded
        return decide(least_loaded(ok or by_id), "no_match", 0)
    pool = ok or {least_loaded(by_id)}

    def placement(r: str) -> tuple:
        spread = state.adapters.count(r) if adapter else 0
        return (spread, state.owned[r], by_id[r].load, rendezvous(key, r))

    return decide(min(pool, key=placement), "no_match")


def _placement_key(request: RouteRequest) -> bytes | str:
    if request.block_hashes:
        return request.block_hashes[0]
    if request.adapter is not None and not request.session_key:
        return f"lora:{request.adapter.name}"  # every ingress places an adapter alike
    return request.session_key or request.request_key
