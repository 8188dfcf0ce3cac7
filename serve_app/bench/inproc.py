"""The in-process reference of `moeserve bench serve`: the same prompts at the same concurrency
straight into AsyncLLMEngine through the in-process front end (tokenizing, detokenizing: the
text work every server does), with no HTTP, no Serve and no Ray.

It answers "how much of the engine's own speed does the serving path keep": a launched target's
output tok/s over this one's, at the same concurrency, measured in the same run. The engine gets
the settings `moeserve serve --ray` gives its router replica (the bench's scheduler limits, KV
memory, every CPU, and for `inproc` the shared prefix cache's Redis tier, which publishes every
full KV block: engine work, not serving-path work; `inproc-local` leaves that tier off), and
each request records what the HTTP client records (TTFT at the first token, ITL, latency), so
both sides are summarised by the same code.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence

from serve_app.bench.config import BenchConfig
from serve_app.bench.load import PassResult, RequestRecord


def build_engine(
    model: str,
    bench: BenchConfig,
    shared_cache_dir: str | None,
    num_threads: int | None = None,
    write_policy: str | None = None,
):
    """The engine `moeserve serve --ray` runs in its router replica (the app config's engine
    settings with the bench's scheduler limits), every CPU. shared_cache_dir: the shared prefix
    cache's tier is on, as it is on the Ray app, with its own embedded redis-server whose state
    lives there (so no other engine's blocks are found); None: no shared tier, like the
    one-process `moeserve serve`. write_policy: the tier's (None: the app config's default)."""
    import dataclasses

    from serve_app.config import AppConfig
    from serve_app.runtime.factory import build_async_engine

    app = AppConfig.model_validate(
        {
            "model": model,
            "engine": {
                "max_num_seqs": bench.max_num_seqs,
                "max_num_batched_tokens": bench.max_num_batched_tokens,
            },
        }
    )
    config = app.engine_config()
    store = app.kv_store_config()
    if store is not None and shared_cache_dir is not None:
        store = dataclasses.replace(store, url=None, embedded_dir=shared_cache_dir)
        if write_policy is not None:
            store = dataclasses.replace(store, write_policy=write_policy)
    else:
        store = None
    return build_async_engine(dataclasses.replace(config, num_threads=num_threads), kv_store=store)


async def _one(client, prompt: str, max_tokens: int, pass_start: float) -> RequestRecord:
    from serve_app.engine.request import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    ttft, last, itl, tokens, prompt_tokens = None, start, [], 0, None
    submitted = await client.submit(prompt, params, uuid.uuid4().hex)
    async for out in submitted.stream:
        now = time.perf_counter()
        prompt_tokens = len(out.prompt_token_ids)
        n = sum(len(c.token_ids) for c in out.outputs)
        if n:
            if ttft is None:
                ttft = now - start
            else:
                itl.append(now - last)
            last = now
            tokens += n
    return RequestRecord(
        ok=tokens > 0,
        status=200,
        error=None if tokens else "no token",
        start_s=start - pass_start,
        latency_s=time.perf_counter() - start,
        ttft_s=ttft,
        itl_s=itl,
        completion_tokens=tokens,
        prompt_tokens=prompt_tokens,
        usage_reported=True,
    )


async def run_inproc_pass(
    engine, prompts: Sequence[str], max_tokens: int, concurrency: int
) -> PassResult:
    """Like load.run_pass: every prompt, never more than `concurrency` in flight."""
    from serve_app.tools.local_client import LocalEngineClient

    client = LocalEngineClient(engine, "inproc")
    gate = asyncio.Semaphore(concurrency)
    t0 = time.perf_counter()

    async def one(prompt: str) -> RequestRecord:
        async with gate:
            return await _one(client, prompt, max_tokens, t0)

    records = await asyncio.gather(*(one(p) for p in prompts))
    return PassResult(list(records), time.perf_counter() - t0)
