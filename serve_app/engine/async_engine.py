"""AsyncLLMEngine: an asyncio face on LLMEngine, with the step loop on its own thread.

The model step is blocking torch work; running it on a dedicated thread keeps the event loop
(HTTP, streaming) responsive. NOTE: the engine is also *built* on that thread, and no other
thread should run torch ops: each thread that enters OpenMP gets its own spinning worker team,
and on a small CPU two teams slow every step down 2.5x (measured: 16 -> 42 ms per token).
Requests and aborts reach the loop through an inbox that the
thread drains between steps, so LLMEngine itself is only ever touched by that thread.
Validation and tokenization run on the caller's side, so bad input raises at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable

from serve_app.engine.config import EngineConfig
from serve_app.engine.engine import EngineStats, LLMEngine, PreparedRequest
from serve_app.engine.errors import (
    EngineDeadError,
    EngineError,
    EngineOverloadedError,
    ExpertsUnavailableError,
)
from serve_app.engine.latency_window import RecentLatencies
from serve_app.engine.outputs import RequestOutput
from serve_app.engine.request import SamplingParams
from serve_app.experts.base import ExpertExecutor

log = logging.getLogger(__name__)

_FAILED = object()  # queue sentinel: the engine loop died


class AsyncLLMEngine:
    """ttft_window_s: how far back `ttft_quantile` looks (the autoscaling TTFT signal)."""

    def __init__(self, engine_factory: Callable[[], LLMEngine], ttft_window_s: float = 60.0):
        # Time to first token, arrival (add_request) to the first output handed to the caller.
        self.ttft = RecentLatencies(ttft_window_s)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: list[tuple[PreparedRequest, asyncio.Queue, asyncio.AbstractEventLoop]] = []
        self._aborts: list[str] = []
        self._streams: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}
        self._stopped = False
        self.dead_error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(engine_factory,), name="moeserve-engine", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self.dead_error is not None:
            raise self.dead_error

    @classmethod
    def from_config(
        cls,
        config: EngineConfig,
        experts: ExpertExecutor | None = None,
        ttft_window_s: float = 60.0,
    ) -> AsyncLLMEngine:
        """Build the engine (model load included) on the engine thread; returns when ready."""
        return cls(lambda: LLMEngine(config, experts), ttft_window_s)

    # ---- public API -------------------------------------------------------------------------

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream incremental outputs. Leaving the loop early (or cancellation) aborts."""
        stream = self.add_request(prompt, params, request_id)
        async for out in stream:
            yield out

    async def compile_grammar(self, params: SamplingParams) -> None:
        """Wait, off the event loop and off the step loop, for the request's grammar to be
        compiled (cached by schema); raises InvalidRequestError for a bad one. Calling it
        before add_request keeps add_request from blocking on a first compile."""
        fut = self.engine.compile_grammar(params)
        if fut is not None:
            await asyncio.wrap_future(fut)

    def add_request(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Validate now (raising InvalidRequestError etc.), then return the output stream."""
        if self.dead_error is not None:
            raise EngineDeadError(f"engine loop died: {self.dead_error}")
        arrived = time.monotonic()
        rid = request_id or uuid.uuid4().hex
        prepared = self.engine.prepare_request(rid, prompt, params)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if len(self._streams) + len(self._inbox) >= self.engine.config.max_waiting_requests:
                raise EngineOverloadedError("too many requests in flight; retry later")
            if rid in self._streams or any(p.request_id == rid for p, _, _ in self._inbox):
                raise EngineError(f"duplicate request id {rid}")
            self._inbox.append((prepared, queue, loop))
            self._wake.notify()
        return self._stream(rid, queue, arrived)

    async def _stream(
        self, rid: str, queue: asyncio.Queue, arrived: float
    ) -> AsyncIterator[RequestOutput]:
        finished = False
        first = True
        try:
            while True:
                out = await queue.get()
                if out is _FAILED:
                    raise EngineDeadError(f"engine loop died: {self.dead_error}")
                if isinstance(out, EngineError):
                    finished = True  # the engine already dropped it
                    raise out
                if first:
                    first = False
                    now = time.monotonic()
                    self.ttft.add(now, (now - arrived) * 1000.0)
                yield out
                if out.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
            self._wake.notify()

    def stats(self) -> EngineStats:
        """Refreshed by the engine thread after every step (no locking of engine internals)."""
        return self._stats

    def ttft_quantile(self, q: float = 0.9) -> float | None:
        """The q-quantile of recent TTFTs in ms; None when no request started in the window."""
        return self.ttft.quantile(q, time.monotonic())

    @property
    def num_queued(self) -> int:
        """Requests waiting in the scheduler, plus those not yet handed to the engine thread."""
        return self._stats.num_waiting + len(self._inbox)

    def health(self) -> dict:
        if self.dead_error is not None:
            return {"status": "dead", "error": str(self.dead_error)}
        s = self._stats
        prefix = {
            "local_queried_tokens": s.prefix_queried_tokens,
            "local_hit_tokens": s.prefix_hit_tokens,
            "remote_queried_tokens": s.prefix_remote_queried_tokens,
            "remote_hit_tokens": s.prefix_remote_hit_tokens,
            "store": dataclasses.asdict(s.kv_store) if s.kv_store is not None else None,
        }
        return {
            "status": "ok",
            "running": s.num_running,
            "waiting": s.num_waiting,
            "kv_blocks_used": s.kv_blocks_used,
            "kv_blocks_total": s.kv_blocks_total,
            "prefix_cache": prefix,
        }

    @property
    def num_in_flight(self) -> int:
        return len(self._streams) + len(self._inbox)

    def shutdown(self) -> None:
        with self._lock:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=10)
        engine = getattr(self, "engine", None)
        if engine is not None and not self._thread.is_alive():
            engine.close()

    # ---- the engine thread ------------------------------------------------------------------

    def _run(self, engine_factory: Callable[[], LLMEngine]) -> None:
        try:
            self.engine = engine_factory()
            self._stats = self.engine.stats()
        except BaseException as e:  # noqa: BLE001 - re-raised by __init__
            self.dead_error = e
            return
        finally:
            self._ready.set()
        try:
            while True:
                with self._lock:
                    while not (
                        self._stopped
                        or self._inbox
                        or self._aborts
                        or self.engine.has_unfinished_requests()
                    ):
                        self._wake.wait()
                    if self._stopped:
                        return
                    inbox, self._inbox = self._inbox, []
                    aborts, self._aborts = self._aborts, []
                for prepared, queue, loop in inbox:
                    try:
                        self.engine.add_prepared(prepared)
                    except EngineError as e:
                        loop.call_soon_threadsafe(queue.put_nowait, _error_output(prepared, e))
                        continue
                    self._streams[prepared.request_id] = (queue, loop)
                for rid in aborts:
                    self.engine.abort_request(rid)
                    self._streams.pop(rid, None)
                try:
                    outputs = self.engine.step()
                except ExpertsUnavailableError as e:
                    self._fail_in_flight(e)
                    continue
                # Before the outputs go out, so a caller that sees them sees these stats too.
                self._stats = self.engine.stats()
                for out in outputs:
                    target = self._streams.get(out.request_id)
                    if target is None:
                        continue
                    if out.finished:
                        del self._streams[out.request_id]
                    queue, loop = target
                    loop.call_soon_threadsafe(queue.put_nowait, out)
        except BaseException as e:  # noqa: BLE001 - any failure must reach every waiter
            log.exception("engine loop died")
            self.dead_error = e
            for queue, loop in self._streams.values():
                loop.call_soon_threadsafe(queue.put_nowait, _FAILED)
            self._streams.clear()

    def _fail_in_flight(self, error: EngineError) -> None:
        """A step failed but the engine is sound: end every request with the error, keep going."""
        log.error("step failed, failing %d requests: %s", len(self._streams), error)
        self.engine.abort_all()
        for queue, loop in self._streams.values():
            loop.call_soon_threadsafe(queue.put_nowait, error)
        self._streams.clear()
        self._stats = self.engine.stats()


def _error_output(prepared: PreparedRequest, error: EngineError) -> RequestOutput:
    """A request refused inside the loop finishes at once with finish_reason 'abort'."""
    from serve_app.engine.outputs import CompletionOutput

    log.warning("request %s refused: %s", prepared.request_id, error)
    outs = [CompletionOutput(i, finish_reason="abort") for i in range(len(prepared.children))]
    return RequestOutput(prepared.request_id, prepared.prompt_token_ids, outs, True)
