"""Exact-state tests of the token-budget scheduler (no torch, no model)."""

from serve_app.engine.block_hash import root_hash
from serve_app.engine.kv_cache_manager import KVCacheManager
from serve_app.engine.request import Request, RequestStatus, SamplingParams
from serve_app.engine.scheduler import Scheduler, SchedulerConfig

BS = 4


def make(num_blocks=16, max_seqs=8, budget=32, max_len=64, chunked=True) -> Scheduler:
    kv = KVCacheManager(num_blocks, BS, root_hash(0, "t"))
    return Scheduler(SchedulerConfig(max_seqs, budget, max_len, chunked), kv)


def req(rid: str, n: int, max_tokens: int = 8, base: int = 0, **kw) -> Request:
    return Request(
        rid,
        list(range(base, base + n)),
        SamplingParams(max_tokens=max_tokens, **kw),
        eos_token_ids=frozenset({0}),
        max_tokens=max_tokens,
    )


def step(s: Scheduler, token: int = 7):
    out = s.schedule()
    sampled = {r.request_id: token for r in out.requests if r.num_computed_tokens == r.num_tokens}
    s.update_from_output(out, sampled)
    return out


def scheduled(out) -> list[tuple[str, int]]:
    return [(r.request_id, n) for r, n in zip(out.requests, out.num_new_tokens, strict=True)]


def test_budget_chunks_long_prompt_and_mixes_decode():
    s = make(budget=16)
    s.add_request(req("a", 6, base=100))
    s.add_request(req("b", 20, base=200))
    out = step(s)
    # a's whole prompt, then b chunked to the remaining budget.
    assert scheduled(out) == [("a", 6), ("b", 10)]
    assert s.requests["a"].output_token_ids == [7] and s.requests["b"].output_token_ids == []
    out = step(s)
    assert scheduled(out) == [("a", 1), ("b", 10)]  # decode + the rest of b's prompt
    assert s.requests["b"].output_token_ids == [7]
    out = step(s)
    assert scheduled(out) == [("a", 1), ("b", 1)]


def test_no_chunking_waits_for_budget():
    s = make(budget=16, chunked=False)
    s.add_request(req("a", 10, base=100))
    s.add_request(req("b", 10, base=200))
    assert scheduled(step(s)) == [("a", 10)]
    assert scheduled(step(s)) == [("a", 1), ("b", 10)]


def test_max_num_seqs():
    s = make(max_seqs=2)
    for i in range(3):
        s.add_request(req(f"r{i}", 4, base=10 * i + 1))
    out = step(s)
    assert [r.request_id for r in out.requests] == ["r0", "r1"]
    assert s.num_waiting == 1


def test_preemption_of_last_admitted_and_recompute():
    # 4 blocks of 4 tokens: two requests of 7 prompt tokens need 2 blocks each, then a third.
    s = make(num_blocks=4, budget=64, max_len=16)
    s.add_request(req("a", 7, base=100, max_tokens=8))
    s.add_request(req("b", 7, base=200, max_tokens=8))
    step(s)  # both prefilled: 8 tokens each after sampling -> the 8th needs no new block yet
    out = step(s)  # each writes token 8 (position 7) -> still 2 blocks each; samples token 9
    assert not out.preempted
    out = s.schedule()  # token 9 of a needs a 3rd block: pool is full -> preempt b
    assert [r.request_id for r in out.preempted] == ["b"]
    assert scheduled(out) == [("a", 1)]
    b = s.requests["b"]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert list(s.waiting) == [b] and b.num_preemptions == 1
    assert s.kv.req_blocks.get("b") is None


def test_abort_anywhere_returns_every_block():
    s = make(num_blocks=8)
    s.add_request(req("a", 9, base=100))
    s.add_request(req("b", 30, base=200))
    s.add_request(req("c", 5, base=300))
    step(s)
    s.finish_requests(["a", "c"], RequestStatus.FINISHED_ABORTED)  # running and waiting
    s.finish_requests(["b"], RequestStatus.FINISHED_ABORTED)
    assert not s.has_unfinished and s.kv.num_free_blocks == 8


def test_stop_conditions():
    s = make()
    s.add_request(req("len", 4, base=1, max_tokens=2))
    step(s)
    step(s)
    assert "len" not in s.requests  # finished by length after 2 tokens
    s.add_request(req("eos", 4, base=1, max_tokens=5))
    step(s, token=0)
    assert "eos" not in s.requests
    s.add_request(req("min", 4, base=1, max_tokens=5, min_tokens=2))
    step(s, token=0)
    assert "min" in s.requests  # eos ignored below min_tokens
    s.add_request(req("stopid", 4, base=1, max_tokens=5, stop_token_ids=[9]))
    out = s.schedule()
    advanced, finished = s.update_from_output(out, {"stopid": 9, "min": 3})
    assert [r.request_id for r in finished] == ["stopid"] and finished[0].stop_reason == 9
    assert s.kv.num_free_blocks == 16 - len(s.kv.req_blocks["min"])


def test_prefix_hit_skips_prefill():
    s = make()
    s.add_request(req("a", 10, base=100))
    step(s)
    s.add_request(req("b", 10, base=100))  # same prompt
    out = s.schedule()
    b = s.requests["b"]
    # 2 full blocks cached; b computes only its last 2 tokens.
    assert ("b", 2) in scheduled(out) and b.num_cached_tokens == 8
