"""Exact-state tests of the block pool and the prefix-caching KV manager (no torch)."""

import pytest

from serve_app.engine.block_hash import extend_block_hashes, hash_block, root_hash
from serve_app.engine.block_pool import BlockPool
from serve_app.engine.kv_cache_manager import KVCacheManager
from serve_app.engine.request import Request, SamplingParams

BS = 4
ROOT = root_hash(0, "model-a")


def make_req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=8))


def test_hash_is_chained_seeded_and_namespaced():
    a = extend_block_hashes([], list(range(10)), BS, ROOT)
    assert len(a) == 2  # only full blocks
    assert a[0] == hash_block(ROOT, [0, 1, 2, 3])
    assert a[1] == hash_block(a[0], [4, 5, 6, 7])
    # Same tokens in block 2, different block 1 -> different block-2 hash (chaining).
    b = extend_block_hashes([], [9, 1, 2, 3, 4, 5, 6, 7], BS, ROOT)
    assert b[1] != a[1]
    assert extend_block_hashes([], list(range(8)), BS, root_hash(1, "model-a"))[0] != a[0]
    assert extend_block_hashes([], list(range(8)), BS, root_hash(0, "model-b"))[0] != a[0]
    # Stable across processes and machines: a pinned value (changing it breaks shared caches).
    assert a[0].hex() == "2b633d6c342634e50432f877b38591333d0d250e92380d31e6880bc655866d2f"


def test_free_queue_lru_order_and_refcounts():
    pool = BlockPool(5)
    assert pool.free_queue.block_ids() == [0, 1, 2, 3, 4]
    a = pool.allocate(2)
    assert [b.block_id for b in a] == [0, 1] and all(b.ref_cnt == 1 for b in a)
    b = pool.allocate(1)
    pool.free(reversed(a))  # tail first
    assert pool.free_queue.block_ids() == [3, 4, 1, 0]
    pool.touch([a[0]])  # a cache hit on an idle block pulls it out of the queue
    assert a[0].ref_cnt == 1 and pool.free_queue.block_ids() == [3, 4, 1]
    pool.touch([b[0]])
    assert b[0].ref_cnt == 2
    pool.free([b[0]])
    assert b[0].ref_cnt == 1 and pool.num_free_blocks == 3
    with pytest.raises(ValueError):
        pool.allocate(4)


def test_eviction_removes_hash_of_reused_block():
    pool = BlockPool(2)
    (blk,) = pool.allocate(1)
    pool.cache_block(blk, b"h1")
    pool.free([blk])
    assert pool.get_cached_block(b"h1") is blk  # idle but still a hit
    pool.allocate(2)  # reuses both blocks; block 1 first, then block 0 (evicted)
    assert pool.get_cached_block(b"h1") is None and blk.block_hash is None


def test_double_free_is_an_error():
    pool = BlockPool(2)
    (blk,) = pool.allocate(1)
    pool.free([blk])
    with pytest.raises(ValueError):
        pool.free([blk])


def test_prefix_hit_miss_and_last_token_never_hit():
    kv = KVCacheManager(10, BS, ROOT)
    r1 = make_req("r1", list(range(10)))  # 2 full blocks + 2 tokens
    kv.update_block_hashes(r1)
    assert kv.get_computed_blocks(r1).num_tokens == 0
    new = kv.allocate_slots(r1, 10)
    assert [b.block_id for b in new] == [0, 1, 2]
    assert len(kv.pool.cached) == 2  # the two full blocks are published

    r2 = make_req("r2", list(range(8)) + [99, 98])  # shares 2 blocks
    kv.update_block_hashes(r2)
    hit = kv.get_computed_blocks(r2)
    assert [b.block_id for b in hit.blocks] == [0, 1] and hit.num_tokens == 8
    new2 = kv.allocate_slots(r2, 2, hit)
    assert [b.block_id for b in new2] == [3]
    assert [b.ref_cnt for b in kv.pool.blocks[:4]] == [2, 2, 1, 1]

    # Exactly 2 full blocks: the last block is not a hit, its last token must be computed.
    r3 = make_req("r3", list(range(8)))
    kv.update_block_hashes(r3)
    assert kv.get_computed_blocks(r3).num_tokens == 4

    miss = make_req("r4", [7] * 10)
    kv.update_block_hashes(miss)
    assert kv.get_computed_blocks(miss).num_tokens == 0


def test_free_returns_every_block_and_keeps_cache_in_lru_order():
    kv = KVCacheManager(6, BS, ROOT)
    r1 = make_req("r1", list(range(12)))
    kv.update_block_hashes(r1)
    kv.allocate_slots(r1, 12)
    kv.free(r1)
    assert kv.num_free_blocks == 6
    # Freed tail first: blocks 2, 1, 0 join after the never-used 3, 4, 5.
    assert kv.pool.free_queue.block_ids() == [3, 4, 5, 2, 1, 0]
    # The idle cached blocks still hit.
    r2 = make_req("r2", list(range(12)) + [5])
    kv.update_block_hashes(r2)
    assert kv.get_computed_blocks(r2).num_tokens == 12


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(3, BS, ROOT)
    r1 = make_req("r1", list(range(8)))
    kv.update_block_hashes(r1)
    kv.allocate_slots(r1, 8)
    r2 = make_req("r2", list(range(100, 112)))
    assert kv.allocate_slots(r2, 12) is None
    assert kv.num_free_blocks == 1 and "r2" not in kv.req_blocks


def test_idle_hit_blocks_count_against_free_space():
    kv = KVCacheManager(3, BS, ROOT)
    r1 = make_req("r1", list(range(8)))
    kv.update_block_hashes(r1)
    kv.allocate_slots(r1, 8)
    kv.free(r1)  # blocks 0, 1 idle + cached, block 2 free
    r2 = make_req("r2", list(range(8)) + list(range(50, 58)))
    kv.update_block_hashes(r2)
    hit = kv.get_computed_blocks(r2)
    assert hit.num_tokens == 8
    # Needs 2 more blocks, but taking the 2 hit blocks leaves only 1 free.
    assert kv.allocate_slots(r2, 8, hit) is None
    assert [b.ref_cnt for b in kv.pool.blocks] == [0, 0, 0]


def test_caching_disabled():
    kv = KVCacheManager(4, BS, ROOT, enable_caching=False)
    r1 = make_req("r1", list(range(8)))
    kv.update_block_hashes(r1)
    kv.allocate_slots(r1, 8)
    assert r1.block_hashes == [] and kv.pool.cached == {}
