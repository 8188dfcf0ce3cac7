"""Exact-state tests of the scheduler with an external prefix source (the shared tier's seam)."""

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


def make(source, num_blocks=16, budget=32):
    kv = KVCacheManager(num_blocks, BS, root_hash(0, "t"))
    kv.record_new_blocks = True
    return Scheduler(SchedulerConfig(8, budget, 64, True), kv, source), kv


def test_external_blocks_follow_the_local_hit_and_skip_compute():
    # Warm the local cache with the first 2 blocks of a 14-token prompt.
    source = FakeSource(set())
    s, kv = make(source)
    s.add_request(req("a", 9, max_tokens=1, base=100))
    step(s)
    assert [b for b, _ in kv.take_new_blocks()] == [0, 1]
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
    # remote blocks are cached locally but not re-published; none of b's blocks is new
    assert kv.take_new_blocks() == []
    assert kv.pool.get_cached_block(b.block_hashes[3]).block_id == load.block_ids[1]


def test_no_load_when_the_pool_cannot_admit_and_match_again_later():
    source = FakeSource(set())
    s, kv = make(source, num_blocks=6)
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


def test_on_reuse_a_computed_block_is_recorded_when_first_hit_and_only_once():
    """write_through_selective: nothing at compute time; the hit blocks when a later request
    reuses them (once, however often they are hit); loaded blocks never; an evicted block
    forgets it was shared."""
    source = FakeSource(set())
    s, kv = make(source, num_blocks=6)
    kv.record_on_reuse = True
    s.add_request(req("a", 9, max_tokens=1, base=100))
    step(s)
    assert kv.take_new_blocks() == []  # computed, not reused yet
    h = hashes_of(kv, 9, 100)
    assert [kv.pool.get_cached_block(x).shared for x in h] == [False, False]
    s.add_request(req("b", 13, max_tokens=1, base=100))  # reuses a's 2 full blocks
    step(s)
    assert kv.take_new_blocks() == [(0, h[0]), (1, h[1])]
    s.add_request(req("c", 9, max_tokens=1, base=100))  # the same 2 blocks again
    step(s)
    assert kv.take_new_blocks() == []
    # blocks loaded from the tier are in it: reusing them records nothing
    d = req("d", 17, base=700)
    s.kv.update_block_hashes(d)
    source.hashes = set(d.block_hashes)
    s.add_request(d)
    out = step(s)
    assert len(out.external_loads) == 1
    s.add_request(req("e", 17, max_tokens=1, base=700))
    out = step(s)
    assert ("e", 1) in scheduled(out)  # 4 blocks hit locally, the last token computed
    assert kv.take_new_blocks() == []
    s.finish_requests(["d"], s.requests["d"].status)
    kv.pool.allocate(kv.pool.num_free_blocks)  # evicts every cached block
    assert all(blk.block_hash is None and not blk.shared for blk in kv.pool.blocks)
