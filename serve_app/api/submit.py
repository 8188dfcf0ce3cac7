"""Submitting the prompts of one request so that a refused request leaves no work behind.

Every prompt is tokenized (the one time for its request) and checked (length against the
context) before any is queued; if anything fails once some are queued, each queued stream is
aborted. A request refused with a 4xx therefore never keeps a prompt generating unread on a
router.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from serve_app.api.client import EngineClient, RouteHint, Submitted
from serve_app.engine.outputs import RequestOutput
from serve_app.engine.request import SamplingParams, resolve_max_tokens

Stream = AsyncIterator[RequestOutput]


async def submit_all(
    client: EngineClient,
    prompts: Sequence[str | list[int]],
    params: SamplingParams,
    request_id: str,
    hint: RouteHint,
) -> list[Submitted]:
    """Submit every prompt (as `<request_id>-<i>`), or none."""
    token_ids = [client.encode_prompt(p) for p in prompts]
    for ids in token_ids:
        resolve_max_tokens(len(ids), params.max_tokens, client.max_model_len)
    submitted: list[Submitted] = []
    try:
        for i, ids in enumerate(token_ids):
            submitted.append(await client.submit(ids, params, f"{request_id}-{i}", hint))
    except BaseException:
        await discard([s.stream for s in submitted])
        raise
    return submitted


async def discard(streams: Sequence[Stream]) -> None:
    """Abort streams whose consumer will never read them.

    NOTE: aclose() of an async generator that never started does not run its `finally`, which
    is where a stream aborts its request; so each one first takes a step in a task that is then
    cancelled (the step either waits inside the stream, where the cancel lands, or returns an
    output, leaving the stream started for aclose)."""
    if not streams:
        return
    steps = [asyncio.ensure_future(_step(s)) for s in streams]
    await asyncio.sleep(0)  # each task runs to its first await inside its stream
    for t in steps:
        t.cancel()
    await asyncio.gather(*steps, return_exceptions=True)
    for s in streams:
        aclose = getattr(s, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except Exception:  # noqa: BLE001 - a stream that failed is already over
                pass


async def _step(stream: Stream) -> None:
    await stream.__anext__()
