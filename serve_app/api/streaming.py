"""Merging the streams of a multi-prompt request, and Server-Sent Events framing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from serve_app.engine.outputs import RequestOutput, coalesce

_DONE = object()


async def merge_streams(
    streams: list[AsyncIterator[RequestOutput]],
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several output streams as (stream index, output), as outputs arrive.

    Closing the merged stream early closes (and so aborts) every source stream.
    """
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
        except Exception as e:  # noqa: BLE001 - re-raised in the consumer
            await queue.put((i, e))
        finally:
            await queue.put((i, _DONE))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        live = len(tasks)
        while live:
            i, item = await queue.get()
            if item is _DONE:
                live -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()  # cancelling a pump closes its stream, which aborts the request
        await asyncio.gather(*tasks, return_exceptions=True)


async def every_n_tokens(
    stream: AsyncIterator[RequestOutput], n: int
) -> AsyncIterator[RequestOutput]:
    """vLLM's stream_interval: the first token at once, then nothing until n more tokens (of
    any choice) are ready or the request finished, sent as one increment. Closing this closes
    (and so aborts) the source."""
    held: list[RequestOutput] = []
    tokens, started = 0, False
    try:
        async for out in stream:
            held.append(out)
            tokens += sum(len(c.token_ids) for c in out.outputs)
            if out.finished or tokens >= n or (not started and tokens):
                started = started or tokens > 0
                yield coalesce(held)
                held, tokens = [], 0
    finally:
        await stream.aclose()


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"
