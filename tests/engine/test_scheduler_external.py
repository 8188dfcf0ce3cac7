"""Exact-state tests of the scheduler with an external prefix source (the shared tier's seam),
and of the block events the KV cache manager emits to a connector."""

from serve_app.engine.block_hash import root_hash
from serve_app.engine.kv_cache_manager import KVCacheManager
from serve_app.engine.scheduler import Scheduler, SchedulerConfig
from tests.engine.test_scheduler import BS, req, scheduled, step


class FakeSource:
    """Holds the block hashes of some 'remote' blocks; records what it was asked."""

    def __init__(self, hashes: set[bytes]):
        self.hashes = hashes
        self.calls: list[tuple[str, int]] = []

    def match(self, request, num_local_blocks):
        self.calls.append((request.request_id, num_local_blocks))
        max_blocks = (request.num_tokens - 1) // BS
        n = 0
        for h in request.block_hashes[num_local_blocks:max_blocks]:
            if h not in self.hashes:
                break
            n += 1
        return n, ("handle", request.request_id)


class RecordingEvents:
    """The BlockEvents a connector hears, as (kind, block id) in order."""

    def __init__(self):
        self.events: list[tuple] = []

    def block_computed(self, block_id, block_hash, holds_output):
        self.events.append(("computed", block_id, holds_output))

    def block_loaded(self, block_id, block_hash):
        self.events.append(("loaded", block_id))

    def block_reused(self, block_id, block_hash):
        self.events.append(("reused", block_id))

    def block_evicted(self, block_id):
        self.events.append(("evicted", block_id))

    def cache_reset(self):
        self.events.append(("reset",))

    def take(self) -> list[tuple]:
        out, self.events = self.events, []
        return out


def make(source, num_blocks=16, budget=32):
    events = RecordingEvents()
    kv = KVCacheManager(num_blocks, BS, root_hash(0, "t"), events=events)
    return Scheduler(SchedulerConfig(8, budget, 64, True), kv, source), kv, events


def test_external_blocks_follow_the_local_hit_and_skip_compute():
    # Warm the local cache with the first 2 blocks of a 14-token prompt.
    source = FakeSource(set())
    s, kv, events = make(source)
    s.add_request(req("a", 9, max_tokens=1, base=100))
    step(s)
    assert events.take() == [("computed", 0, False), ("computed", 1, False)]
    # "b" shares 2 blocks locally; Redis holds blocks 2 and 3 of it (not the last token's).
    b = req("b", 17, base=100)
    s.kv.update_block_hashes(b)
    source.hashes = set(b.block_hashes)
    s.add_request(b)
    out = s.schedule()
    assert source.calls[-1] == ("b", 2)
    # 2 local + 2 remote blocks of 4: only token 16 (the last) is computed.
    assert scheduled(out) == [("b", 1)]
    assert b.num_cached_tokens == 16 and b.num_computed_tokens == 17
    assert len(out.external_loads) == 1
    load = out.external_loads[0]
    assert load.request_id == "b" and load.handle == ("handle", "b")
    assert load.block_ids == kv.block_ids("b")[2:4]
    # the local hit is told reused, the remote blocks loaded (not computed); nothing else
    loaded = [("loaded", i) for i in load.block_ids]
    assert events.take() == [("reused", 0), ("reused", 1), *loaded]
    assert kv.pool.get_cached_block(b.block_hashes[3]).block_id == load.block_ids[1]


def test_no_load_when_the_pool_cannot_admit_and_match_again_later():
    source = FakeSource(set())
    s, kv, _ = make(source, num_blocks=6)
    s.add_request(req("big", 20, max_tokens=4, base=0))  # holds 5 of 6 blocks
    step(s)
    r = req("r", 9, base=500)
    s.kv.update_block_hashes(r)
    source.hashes = set(r.block_hashes)
    s.add_request(r)
    out = step(s)
    assert scheduled(out) == [("big", 1)] and out.external_loads == []
    assert source.calls == [("big", 0), ("r", 0)]
    s.finish_requests(["big"], s.requests["big"].status)
    out = s.schedule()
    assert source.calls[1:] == [("r", 0), ("r", 0)]
    assert scheduled(out) == [("r", 1)]
    assert out.external_loads[0].block_ids == kv.block_ids("r")[:2]


def hashes_of(kv, n: int, base: int) -> list[bytes]:
    r = req("probe", n, base=base)
    kv.update_block_hashes(r)
    return r.block_hashes


def test_events_of_generated_blocks_evictions_and_reset():
    """A block that fills while decoding is computed with holds_output; reallocating a cached
    block evicts its hash; a reset is told once."""
    s, kv, events = make(FakeSource(set()), num_blocks=4)
    s.add_request(req("a", BS + 3, max_tokens=3, base=100))  # 1 full block + 3 tokens
    step(s)
    assert events.take() == [("computed", 0, False)]
    step(s)  # the first generated token is computed: block 1 (3 prompt + 1 generated) fills
    assert events.take() == [("computed", 1, True)]
    s.finish_requests(["a"], s.requests["a"].status)
    kv.pool.allocate(kv.pool.num_free_blocks)  # reallocates every block, a's tail first
    assert events.take() == [("evicted", 1), ("evicted", 0)]
    kv.pool.free(kv.pool.blocks)
    assert kv.reset_prefix_cache() and events.take() == [("reset",)]


def test_no_events_without_a_listener():
    kv = KVCacheManager(4, BS, root_hash(0, "t"))
    s = Scheduler(SchedulerConfig(8, 32, 64, True), kv)
    s.add_request(req("a", 17, max_tokens=1, base=1))
    step(s)
    assert kv.events is None and kv.pool.events is None
