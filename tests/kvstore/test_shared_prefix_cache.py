"""Two engines (two router replicas) sharing one real redis-server, on the tiny Qwen3-MoE.

Every test uses its own prompt, so the engines' local caches never hide the remote tier.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
from contextlib import contextmanager

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from serve_app.engine.async_engine import AsyncLLMEngine
from serve_app.engine.block_hash import extend_block_hashes
from serve_app.engine.request import SamplingParams
from serve_app.kvstore.codec import HEADER_SIZE, decode_block
from serve_app.kvstore.settings import KVStoreConfig
from serve_app.kvstore.stats import describe_store
from serve_app.runtime.llm import LLM
from tests.kvstore.conftest import RedisProc

BS = 16
PREFIX = 160  # 10 full blocks
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
# The machine is shared and small: a generous lookup timeout keeps these tests deterministic;
# test_slow_redis_lookup_times_out checks a tight one.
LOOKUP_MS = 1000


def prompt(seed: int, n: int = PREFIX) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 512) for _ in range(n)]


def make_engine(model, url: str | None, block_size: int = BS, **store) -> LLM:
    store.setdefault("lookup_timeout_ms", LOOKUP_MS)
    return LLM(
        str(model),
        num_kv_blocks=96,
        block_size=block_size,
        max_model_len=512,
        kv_store=KVStoreConfig(url=url, **store),
    )


def run(llm: LLM, ids: list[int], params: SamplingParams = GREEDY):
    return llm.generate([ids], params)[0]


def publish(llm: LLM, ids: list[int]):
    out = run(llm, ids)
    assert llm.engine.connector.tier.flush(20)
    return out


@contextmanager
def computed_tokens(llm: LLM):
    """Counts the tokens the model actually runs (prefill chunks + decodes)."""
    runner = llm.engine.runner
    counter = [0]
    original = runner.execute

    def execute(sched, block_ids):
        counter[0] += sched.total_num_tokens
        return original(sched, block_ids)

    runner.execute = execute
    try:
        yield counter
    finally:
        runner.execute = original


@pytest.fixture(scope="module")
def ref(qwen3_tiny) -> LLM:
    return LLM(str(qwen3_tiny), num_kv_blocks=96, max_model_len=512, enable_prefix_caching=False)


@pytest.fixture(scope="module")
def pair(qwen3_tiny, redis_server):
    a, b = make_engine(qwen3_tiny, redis_server.url), make_engine(qwen3_tiny, redis_server.url)
    yield a, b
    a.engine.close()
    b.engine.close()


def test_only_the_prompts_blocks_are_published_unless_decode_blocks_are_asked_for(
    qwen3_tiny, redis_server
):
    """2 full prompt blocks, then 40 generated tokens: 71 tokens get K/V, so 4 full blocks, the
    last 2 of generated tokens (kept locally either way; sent to Redis only when asked)."""
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for seed, publish_decode, expected in ((901, False, 2), (902, True, 4)):
        llm = make_engine(qwen3_tiny, redis_server.url, publish_decode=publish_decode)
        try:
            run(llm, prompt(seed, 2 * BS), params)
            assert llm.engine.connector.tier.flush(20)
            assert llm.engine.stats().kv_store.blocks_published == expected, publish_decode
        finally:
            llm.engine.close()


def test_a_prompt_block_split_across_prefill_chunks_is_published(qwen3_tiny, redis_server):
    """Chunks of 40 tokens end inside blocks 2, 4, 7: each such block becomes full in the next
    chunk and must still reach Redis (it was skipped once: only blocks full when allocated were
    recorded)."""
    llm = LLM(
        str(qwen3_tiny),
        num_kv_blocks=96,
        block_size=BS,
        max_model_len=512,
        max_num_batched_tokens=40,
        kv_store=KVStoreConfig(url=redis_server.url, lookup_timeout_ms=LOOKUP_MS),
    )
    try:
        run(llm, prompt(903), SamplingParams(temperature=0, max_tokens=1))
        assert llm.engine.connector.tier.flush(20)
        assert llm.engine.stats().kv_store.blocks_published == PREFIX // BS
    finally:
        llm.engine.close()


def test_replica_b_loads_the_prefix_a_computed_and_matches_greedy(pair, ref):
    a, b = pair
    p = prompt(1)
    publish(a, p)
    assert a.engine.stats().kv_store.blocks_published >= PREFIX // BS
    before = b.engine.stats()
    query = p + [7, 8, 9, 10, 11]
    with computed_tokens(b) as computed:
        got = run(b, query)
    after = b.engine.stats()
    assert got.num_cached_tokens == PREFIX
    assert after.prefix_remote_hit_tokens - before.prefix_remote_hit_tokens == PREFIX
    assert after.prefix_hit_tokens == before.prefix_hit_tokens  # nothing was local
    # only the 5-token suffix is prefilled, then one token per decode step
    assert computed[0] == 5 + (GREEDY.max_tokens - 1)
    fetched = after.kv_store.bytes_fetched - before.kv_store.bytes_fetched
    entry = HEADER_SIZE + 2 * 2 * BS * 2 * 16 * 4  # L=2, K+V, B, Hkv=2, D=16, float32
    assert fetched == PREFIX // BS * entry
    assert got.choices[0].token_ids == run(ref, query).choices[0].token_ids


def test_selective_writes_publish_a_prefix_when_its_replica_reuses_it(
    qwen3_tiny, redis_server, ref
):
    """write_through_selective: a prompt seen once costs Redis nothing; its second request on
    the same replica (a local hit) publishes the reused blocks, which another replica loads."""
    a = make_engine(qwen3_tiny, redis_server.url, write_policy="write_through_selective")
    b = make_engine(qwen3_tiny, redis_server.url)
    try:
        p = prompt(905)
        run(a, p)
        assert a.engine.connector.tier.flush(20)
        assert a.engine.stats().kv_store.blocks_published == 0
        assert run(a, p + [4, 5]).num_cached_tokens == PREFIX  # reused locally
        assert a.engine.connector.tier.flush(20)
        assert a.engine.stats().kv_store.blocks_published == PREFIX // BS
        query = p + [7, 8, 9, 10, 11]
        got = run(b, query)
        assert got.num_cached_tokens == PREFIX
        assert b.engine.stats().prefix_remote_hit_tokens == PREFIX
        assert got.choices[0].token_ids == run(ref, query).choices[0].token_ids
    finally:
        a.engine.close()
        b.engine.close()


@pytest.mark.parametrize(
    "policy, published", [("write_through", [2, 2]), ("write_through_selective", [0, 4])]
)
def test_a_follow_up_turn_on_the_same_replica_publishes_the_answer_only_when_selective(
    qwen3_tiny, redis_server, policy, published
):
    """Turn 1: 2 prompt blocks, 40 generated tokens (2 more full blocks). Turn 2 repeats all of
    it: a local hit of 4 blocks. write_through published the prompt's 2 at turn 1 and nothing
    at the hit; selective nothing at turn 1 and the 4 reused ones (2 of generated tokens)."""
    llm = make_engine(qwen3_tiny, redis_server.url, write_policy=policy)
    tier = llm.engine.connector.tier
    try:
        first = prompt(906 if policy == "write_through" else 907, 2 * BS)
        out = run(llm, first, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
        assert tier.flush(20)
        counts = [llm.engine.stats().kv_store.blocks_published]
        follow_up = first + out.choices[0].token_ids + [5, 6, 7]
        assert run(llm, follow_up).num_cached_tokens == 4 * BS
        assert tier.flush(20)
        counts.append(llm.engine.stats().kv_store.blocks_published)
        assert counts == published
    finally:
        llm.engine.close()


def test_a_hit_refreshes_the_entry_ttl(qwen3_tiny, redis_server, ref):
    a = make_engine(qwen3_tiny, redis_server.url, key_prefix="ttl", ttl_s=30)
    b = make_engine(qwen3_tiny, redis_server.url, key_prefix="ttl", ttl_s=30)
    try:
        p = prompt(2)
        publish(a, p)
        r = redis_server.client()
        keys = [k for k in r.scan_iter("ttl:*")]
        assert len(keys) >= PREFIX // BS and all(0 < r.ttl(k) <= 30 for k in keys)
        for k in keys:
            r.expire(k, 5)
        got = run(b, p + [3])
        assert got.num_cached_tokens == PREFIX
        refreshed = [r.ttl(k) for k in keys]
        assert sum(t > 5 for t in refreshed) == PREFIX // BS, refreshed
    finally:
        a.engine.close()
        b.engine.close()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other_block"])
def test_corrupt_entry_is_a_counted_miss_deleted_and_output_correct(
    pair, ref, redis_server, damage
):
    a, b = pair
    p = prompt({"garbage": 10, "truncated": 11, "other_block": 12}[damage])
    publish(a, p)
    tier = b.engine.connector.tier
    r = redis_server.client()
    block_hashes = extend_block_hashes([], p, BS, a.engine.kv.root_hash)
    key4 = tier.key(block_hashes[4])
    good = r.get(key4)
    bad = {
        "garbage": b"\x80\x04not a KV block",
        "truncated": good[: len(good) // 2],
        "other_block": r.get(tier.key(block_hashes[5])),
    }[damage]
    r.set(key4, bad)
    before = b.engine.stats()
    query = p + [1, 2, 3]
    got = run(b, query)
    after = b.engine.stats()
    assert got.num_cached_tokens == 4 * BS  # blocks 0..3 from Redis, the rest computed
    assert after.kv_store.corrupt_entries == before.kv_store.corrupt_entries + 1
    # deleted, then re-published by B, which computed that block itself
    assert tier.flush(20)
    fixed = r.get(key4)
    assert fixed != bad
    decode_block(fixed, block_hashes[4], tier.layout)
    assert got.choices[0].token_ids == run(ref, query).choices[0].token_ids


def test_model_versions_never_share_entries(qwen3_tiny, pair, redis_server, tmp_path):
    a, _ = pair
    # another version of the same model: one weight changed, everything else identical
    other = tmp_path / "model-v2"
    other.mkdir()
    for f in qwen3_tiny.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    weights_file = next(other.glob("*.safetensors"))
    weights = load_file(weights_file)
    name = next(n for n in weights if n.endswith("q_proj.weight"))
    weights[name] = weights[name] * 1.01
    save_file(weights, weights_file, metadata={"format": "pt"})
    v2 = make_engine(other, redis_server.url)
    b8 = make_engine(qwen3_tiny, redis_server.url, block_size=8)
    try:
        p = prompt(20)
        publish(a, p)
        digests = {e.engine.model_digest for e in (a, v2, b8)}
        assert len(digests) == 3
        for e in (v2, b8):
            got = run(e, p + [1])
            assert got.num_cached_tokens == 0
            assert e.engine.stats().prefix_remote_hit_tokens == 0
        r = redis_server.client()
        a_keys = {k.decode().rsplit(":", 1)[1] for k in r.scan_iter(f"*{a.engine.model_digest}*")}
        for e in (v2, b8):
            e.engine.connector.tier.flush(20)
            mine = {k.decode().rsplit(":", 1)[1] for k in r.scan_iter(f"*{e.engine.model_digest}*")}
            assert mine and not mine & a_keys
    finally:
        v2.engine.close()
        b8.engine.close()


def test_int8_blocks_keep_logits_close_and_greedy_equal(qwen3_tiny, redis_server, ref):
    a = make_engine(qwen3_tiny, redis_server.url, int8=True)
    b = make_engine(qwen3_tiny, redis_server.url, int8=True)
    try:
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=5)
        worst = 0.0
        for seed in (30, 31, 32):
            p = prompt(seed)
            publish(a, p)
            query = p + [5, 6]
            got = run(b, query, params)
            want = run(ref, query, params)
            assert got.num_cached_tokens == PREFIX
            assert got.choices[0].token_ids == want.choices[0].token_ids
            for g, w in zip(got.choices[0].logprobs, want.choices[0].logprobs, strict=True):
                top_g = dict(g.top)
                for tok, lp in w.top:
                    if tok in top_g:
                        worst = max(worst, abs(top_g[tok] - lp))
        # Tolerance: INT8 with one scale per (layer, K/V, head) errs by <= amax/254 per element.
        # This random tiny model (init range 0.3) is very sensitive: rounding the same KV to
        # bfloat16 already moves top-5 log-probs by up to 0.05 nats, INT8 by up to 0.16
        # (measured on these prompts; per-token and KIVI-style scales did no better). 0.25 nats
        # bounds that with margin while still failing loudly on a wrong scale or layout (errors
        # of whole nats, and different greedy tokens).
        assert worst < 0.25, worst
        s8 = b.engine.stats().kv_store
        raw_entry = HEADER_SIZE + 2 * 2 * BS * 2 * 16 * 4
        int8_entry = s8.bytes_fetched / s8.blocks_fetched
        assert int8_entry < raw_entry / 3
        assert a.engine.model_digest != ref.engine.model_digest
    finally:
        a.engine.close()
        b.engine.close()


def test_slow_redis_lookup_times_out(qwen3_tiny, pair, redis_server, ref):
    a, _ = pair
    fast = make_engine(qwen3_tiny, redis_server.url, lookup_timeout_ms=20)
    try:
        p = prompt(40)
        publish(a, p)
        r = redis_server.client()
        r.execute_command("CLIENT", "PAUSE", 1500, "ALL")
        try:
            t0 = time.monotonic()
            got = run(fast, p + [1])
            elapsed = time.monotonic() - t0
        finally:
            r.execute_command("CLIENT", "UNPAUSE")
        s = fast.engine.stats().kv_store
        assert s.lookup_timeouts == 1 and s.lookups == 1
        # the engine waited ~20 ms, not the 1.5 s pause (slack for a loaded 2-core machine)
        assert s.lookup_latency["max_ms"] < 300
        assert elapsed < 1.5
        assert got.num_cached_tokens == 0
        assert got.choices[0].token_ids == run(ref, p + [1]).choices[0].token_ids
    finally:
        fast.engine.close()


def test_redis_killed_mid_load_and_restarted(qwen3_tiny, ref, caplog):
    server = RedisProc().start()
    a, b = make_engine(qwen3_tiny, server.url), make_engine(qwen3_tiny, server.url)
    caplog.set_level(logging.INFO, logger="serve_app.kvstore")
    try:
        results = []

        def check(llm, ids):
            got = run(llm, ids)
            want = run(ref, ids).choices[0].token_ids
            results.append(
                got.choices[0].finish_reason == "length" and got.choices[0].token_ids == want
            )
            return got

        p = prompt(50)
        publish(a, p)
        assert check(b, p + [1]).num_cached_tokens == PREFIX

        # Kill the server at the moment B starts fetching blocks it has just found.
        tier = b.engine.connector.tier
        original = tier._get_decode

        def killed_mid_load(hashes):
            server.kill()
            return original(hashes)

        tier._get_decode = killed_mid_load
        q = prompt(51)
        publish(a, q)
        assert check(b, q + [1]).num_cached_tokens == 0
        tier._get_decode = original
        # While it is down: every request is served by local compute, none waits for Redis.
        for seed in (52, 53):
            check(a, prompt(seed))
            check(b, prompt(seed) + [2])
        s = b.engine.stats().kv_store
        assert not s.connected and s.degradation_events == 1 and s.fetch_failures == 1
        assert "redis unavailable" in caplog.text

        server.start()  # same port, empty
        deadline = time.monotonic() + 30
        seed = 60
        while b.engine.stats().prefix_remote_hit_tokens <= PREFIX:
            assert time.monotonic() < deadline, "no remote hits after the restart"
            time.sleep(0.2)
            seed += 1
            publish(a, prompt(seed))
            check(b, prompt(seed) + [3])
        assert all(results) and len(results) >= 6
        assert b.engine.stats().kv_store.connected
        assert "connected to" in caplog.text
    finally:
        a.engine.close()
        b.engine.close()
        server.stop()


def test_redis_unavailable_at_start_then_reconnects(qwen3_tiny, ref, caplog):
    server = RedisProc()  # not started yet
    caplog.set_level(logging.WARNING, logger="serve_app.kvstore")
    e = make_engine(qwen3_tiny, server.url)
    try:
        s = e.engine.stats().kv_store
        assert not s.connected and s.degradation_events == 1
        assert "redis unavailable during start" in caplog.text
        # /health (and make run's line) say where and why
        assert s.url == server.url and s.last_error.startswith("start: ConnectionError")
        assert describe_store(dataclasses.asdict(s), "-").startswith(
            f"shared prefix cache: NOT connected ({server.url}; start: ConnectionError"
        )
        p = prompt(70)
        assert run(e, p).choices[0].token_ids == run(ref, p).choices[0].token_ids
        server.start()
        deadline = time.monotonic() + 30
        while not e.engine.stats().kv_store.connected:
            assert time.monotonic() < deadline
            run(e, [1, 2, 3])  # steps drive the (non-blocking) reconnect
            time.sleep(0.1)
        assert e.engine.stats().kv_store.last_error is None
        publish(e, prompt(71))
        assert e.engine.stats().kv_store.blocks_published >= PREFIX // BS
    finally:
        e.engine.close()
        server.stop()


def test_embedded_redis_is_started_shared_taken_over_and_stopped(qwen3_tiny, tmp_path, ref):
    a = make_engine(qwen3_tiny, None, embedded_dir=str(tmp_path), embedded_maxmemory_mb=64)
    b = make_engine(qwen3_tiny, None, embedded_dir=str(tmp_path), embedded_maxmemory_mb=64)
    first = a.engine.connector.embedded.pid
    try:
        assert first is not None and b.engine.connector.embedded.pid is None  # b uses a's
        assert a.engine.connector.tier._url == b.engine.connector.tier._url
        s = b.engine.stats().kv_store
        port = s.url.split(":")[-1].split("/")[0]
        assert s.embedded and describe_store(dataclasses.asdict(s), "-") == (
            f"shared prefix cache: embedded redis-server at 127.0.0.1:{port} (connected)"
        )
        cfg = a.engine.connector.tier._io_client.config_get("maxmemory*")
        assert cfg["maxmemory"] == str(64 << 20) and cfg["maxmemory-policy"] == "allkeys-lru"
        p = prompt(80)
        publish(a, p)
        got = run(b, p + [4])
        assert got.num_cached_tokens == PREFIX
        assert got.choices[0].token_ids == run(ref, p + [4]).choices[0].token_ids
        a.engine.close()  # the owner leaves: its server stops (by PID) ...
        with pytest.raises(ProcessLookupError):
            os.kill(first, 0)
        deadline = time.monotonic() + 30
        seed = 81
        # ... b notices at its next lookup, and its reconnect starts the next server
        while b.engine.connector.embedded.pid is None or not b.engine.stats().kv_store.connected:
            assert time.monotonic() < deadline
            seed += 1
            run(b, prompt(seed, 40))
            time.sleep(0.1)
        second = b.engine.connector.embedded.pid
        assert second != first and b.engine.stats().kv_store.degradation_events == 1
    finally:
        a.engine.close()
        b.engine.close()
    with pytest.raises(ProcessLookupError):
        os.kill(second, 0)


def test_health_reports_the_shared_cache(pair):
    _, b = pair
    eng = AsyncLLMEngine.__new__(AsyncLLMEngine)  # only the health() view, no loop thread
    eng.dead_error, eng._stats, eng.engine = None, b.engine.stats(), b.engine
    health = json.loads(json.dumps(eng.health()))
    pc = health["prefix_cache"]
    assert pc["remote_hit_tokens"] == b.engine.stats().prefix_remote_hit_tokens > 0
    assert pc["store"]["connected"] is True and pc["store"]["last_error"] is None
    assert pc["store"]["url"].startswith("redis://127.0.0.1:") and not pc["store"]["embedded"]
    assert sum(pc["store"]["lookup_latency"]["counts"]) == pc["store"]["lookups"]
    assert np.isfinite(pc["store"]["lookup_latency"]["sum_ms"])


def test_the_tiers_threads_have_their_own_os_names(pair):
    """Created from the engine thread, they would inherit its name and be counted as the
    engine's CPU by `moeserve bench serve` (serve_app.bench.cpu_usage)."""
    from pathlib import Path

    from serve_app.kvstore.redis_tier import IO_THREAD, PUBLISH_THREAD

    a, _ = pair
    publish(a, prompt(5))  # the I/O thread has run
    names = [(t / "comm").read_text().strip() for t in Path("/proc/self/task").iterdir()]
    assert names.count(PUBLISH_THREAD) >= 1 and names.count(IO_THREAD) >= 1
