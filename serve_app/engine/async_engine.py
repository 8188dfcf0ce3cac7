"""AsyncLLMEngine: an asyncio face on LLMEngine, with the step loop on its own thread.

The model step is blocking torch work; running it on a dedicated thread keeps the event loop
(HTTP, streaming) responsive. NOTE: the engine is also *built* on that thread, and no other
thread should run torch ops: each thread that enters OpenMP gets its own spinning worker team,
and on a small CPU two teams slow every step down 2.5x (measured: 16 -> 42 ms per token).
Requests and aborts reach the loop through an inbox that the
thread drains between steps, so LLMEngine itself is only ever touched by that thread.
Validation runs on the caller's side, so bad input raises at once.

Token-in/token-out: a call brings EngineRequests (token ids; a request's n sequences together)
and gets EngineOutputs back; the thread makes no text (the front end does: serve_app/frontend).
Outputs go back once per step and event loop: the engine thread hands each loop the whole
step's outputs in one call_soon_threadsafe, not one wake-up per request, and the loop feeds
each call's sink synchronously (the in-process front end's queue, or the router's batched
output channel).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from serve_app.engine.engine import LLMEngine
from serve_app.engine.errors import (
    EngineDeadError,
    EngineError,
    EngineOverloadedError,
    ExpertsUnavailableError,
)
from serve_app.engine.latency_window import RecentLatencies
from serve_app.engine.outputs import EngineOutput, EngineRequest
from serve_app.engine.request import Request
from serve_app.engine.stats import EngineStats
from serve_app.platform import sched
from serve_app.platform.device import name_os_thread

log = logging.getLogger(__name__)

ENGINE_THREAD_NAME = "moeserve-engine"  # also the OS thread's name (profilers, bench CPU split)


class OutputSink(Protocol):
    """Where a call's items go, called on its event loop: each sequence's EngineOutputs in
    order, or an EngineError (the call failed; nothing follows it)."""

    def put_nowait(self, item: EngineOutput | EngineError) -> None: ...


class _Subscriber:
    """A call's sink, its event loop and its arrival time (for TTFT), shared by the call's
    sequences."""

    __slots__ = ("sink", "loop", "arrived", "started")

    def __init__(self, sink: OutputSink, loop: asyncio.AbstractEventLoop, arrived: float):
        self.sink, self.loop, self.arrived, self.started = sink, loop, arrived, False


class AsyncLLMEngine:
    """ttft_window_s: how far back `ttft_quantile` looks (the autoscaling TTFT signal)."""

    def __init__(self, engine_factory: Callable[[], LLMEngine], ttft_window_s: float = 60.0):
        # Time to first token, arrival (add_request) to the first output handed to the caller.
        self.ttft = RecentLatencies(ttft_window_s)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: list[tuple[Request, _Subscriber]] = []
        self._aborts: list[str] = []
        self._streams: dict[str, _Subscriber] = {}
        self._stopped = False
        self.dead_error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(engine_factory,), name=ENGINE_THREAD_NAME, daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self.dead_error is not None:
            raise self.dead_error

    # ---- public API -------------------------------------------------------------------------

    async def before_add(self, request: EngineRequest) -> None:
        """The slow parts of admitting `request`, off the event loop and off the step loop:
        its grammar compiled (cached by schema) and its LoRA adapter made resident (a disk or
        host-tier load); raises InvalidRequestError for a bad grammar or adapter. Awaiting it
        before add_request_to keeps that from blocking every stream of the replica on a first
        compile or an adapter load (the adapter may be evicted again in between: then
        add_request_to loads it once more, on the loop)."""
        fut = self.engine.compile_grammar(request.params)
        if fut is not None:
            await asyncio.wrap_future(fut)
        if request.lora is not None:
            await asyncio.to_thread(self.engine.resolve_adapter, request.lora)

    def add_request_to(self, requests: list[EngineRequest], sink: OutputSink) -> None:
        """Validate now (raising InvalidRequestError etc.), then feed the sequences' items to
        `sink` on the calling event loop; all of them or none are queued. Abort each with
        `abort`."""
        if self.dead_error is not None:
            raise EngineDeadError(f"engine loop died: {self.dead_error}")
        arrived = time.monotonic()
        prepared = [self.engine.prepare_request(r) for r in requests]
        loop = asyncio.get_running_loop()
        with self._lock:
            in_flight = len(self._streams) + len(self._inbox)
            if in_flight + len(prepared) > self.engine.config.max_waiting_requests:
                raise EngineOverloadedError("too many requests in flight; retry later")
            queued = {p.request_id for p, _ in self._inbox}
            for req in prepared:
                if req.request_id in self._streams or req.request_id in queued:
                    raise EngineError(f"duplicate request id {req.request_id}")
            sub = _Subscriber(sink, loop, arrived)  # one per call: one TTFT per request
            self._inbox.extend((req, sub) for req in prepared)
            self._wake.notify()

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
            self._wake.notify()

    def stats(self) -> EngineStats:
        """Refreshed by the engine thread after every step (no locking of engine internals);
        the shared-prefix connector's counters are read live from it (it locks its own): it
        sends a step's blocks after that step, so an idle engine's last snapshot would miss
        them until the next request."""
        s, connector = self._stats, self.engine.connector
        if connector is None or s.kv_store is None:
            return s
        return dataclasses.replace(s, kv_store=connector.stats())

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
            "kv_cache": {
                "format": s.kv_format,
                "dtype": s.kv_dtype,
                "block_bytes": s.kv_block_bytes,
                "lora_blocks": s.kv_lora_blocks,  # given up to the adapters' reserve
            },
            "weights": {"bytes": s.weight_bytes, "quantization": s.quantization},
            "prefix_cache": prefix,
            "lora": self._lora_health(),
        }

    def _lora_health(self) -> dict:
        """From the registry itself (it locks), not the last step's stats: an admin load or
        unload on an idle engine shows at once."""
        lora, mem = self.engine.lora, self.engine.lora.memory()
        return {
            **mem._asdict(),
            "pinned": list(mem.pinned),  # JSON's shape, also where the dict is not serialized
            "max_loras": lora.max_loras,
            "loads_disk": lora.num_disk_loads,
            "loads_host": lora.num_host_loads,
            "evictions": lora.num_evictions,
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
        name_os_thread(ENGINE_THREAD_NAME)
        # the normal policy even where the process runs at SCHED_BATCH, before the first torch
        # op: the OpenMP workers this thread creates inherit it (serve_app.platform.sched)
        sched.set_thread("normal")
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
                for req, sub in inbox:
                    try:
                        self.engine.add_prepared(req)
                    except EngineError as e:
                        log.warning("request %s refused: %s", req.request_id, e)
                        self._send([(sub, EngineOutput(req.request_id, [], None, "abort"))])
                        continue
                    self._streams[req.request_id] = sub
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
                batch = []
                for out in outputs:
                    sub = self._streams.get(out.request_id)
                    if sub is None:
                        continue
                    if out.finish_reason is not None:
                        del self._streams[out.request_id]
                    batch.append((sub, out))
                self._send(batch)
        except BaseException as e:  # noqa: BLE001 - any failure must reach every waiter
            log.exception("engine loop died")
            self.dead_error = e
            dead = EngineDeadError(f"engine loop died: {e}")
            self._send([(sub, dead) for sub in self._streams.values()])
            self._streams.clear()

    def _send(self, batch: list[tuple[_Subscriber, EngineOutput | EngineError]]) -> None:
        """One call_soon_threadsafe per event loop for the whole batch (engine thread)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for sub, item in batch:
            by_loop.setdefault(sub.loop, []).append((sub, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._deliver, items)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                pass

    def _deliver(self, items: list[tuple[_Subscriber, EngineOutput | EngineError]]) -> None:
        """On the subscribers' event loop: hand each item over, timing first outputs."""
        now = time.monotonic()
        for sub, item in items:
            if not sub.started and isinstance(item, EngineOutput):
                sub.started = True
                self.ttft.add(now, (now - sub.arrived) * 1000.0)
            try:
                sub.sink.put_nowait(item)
            except Exception:  # noqa: BLE001 - one broken sink must not starve the others
                log.exception("output sink failed for %s", getattr(item, "request_id", "?"))

    def _fail_in_flight(self, error: EngineError) -> None:
        """A step failed but the engine is sound: end every request with the error, keep going."""
        log.error("step failed, failing %d requests: %s", len(self._streams), error)
        self.engine.abort_all()
        self._send([(sub, error) for sub in self._streams.values()])
        self._streams.clear()
        self._stats = self.engine.stats()
