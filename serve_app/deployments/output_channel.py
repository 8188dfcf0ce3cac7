"""Router -> ingress output channel: one TCP connection per (router replica, ingress replica),
one frame per engine step with every token output of that step bound for that ingress, and
the ingress's aborts (a stop string matched in its front end) back the other way.

Why: a Serve streaming call carries each token of each stream as its own Ray object, with its
own task report, serialisation and event-loop work on both sides: about 2 ms of CPU per token
per hop on a 2-core machine (docs/benchmarks.md), which at 32 streams took half the CPU from
the engine. vLLM (API server <-> engine core over ZMQ) and SGLang (tokenizer manager <->
scheduler) batch a step's outputs into one message the same way.

The request itself still goes through a Serve handle (`Router.generate_to`, a request's n
sequences in one call): Serve picks the replica, counts the request as ongoing for routing and
autoscaling until it finishes, and a cancelled call aborts it. Only the outputs (and the aborts
of single sequences) take this channel. The ingress listens (its node's
Ray address, a free port) and tells each request where to reply, with a random token that the
router sends first on the connection. The framing, the token, the timeouts and the address are
the expert channel's (serve_app.platform.channel); the records are typed (output_wire.py), JSON
on the wire, never pickle.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from serve_app.deployments.output_wire import (
    ABORT_MAGIC,
    MAX_FRAME,
    OUTPUT_MAGIC,
    AbortRecord,
    ErrorRecord,
    OutputRecord,
    Record,
    WireError,
    decode_records,
    encode_records,
)
from serve_app.engine.errors import EngineError
from serve_app.engine.outputs import EngineOutput
from serve_app.platform.channel import (
    ChannelAddress,
    ChannelError,
    frame_header,
    new_token,
    open_channel,
    read_frame,
    read_token,
)

log = logging.getLogger(__name__)

MAX_UNSENT_BYTES = 256 << 20  # a router whose ingress stopped reading gives up past this

# Where a request's outputs go: an ingress replica's inbox.
ReplyTo = ChannelAddress


# --- the ingress's end ---------------------------------------------------------------------


class OutputInbox:
    """A TCP server for the routers' connections; each record goes to its stream's queue.

    Streams are numbered here (clients choose request ids, so those may collide); a record for
    a stream that is closed (its client left) is dropped."""

    def __init__(self, host: str):
        self.host = host
        self.token = new_token()
        self.port = 0
        self._queues: dict[int, asyncio.Queue] = {}
        self._writers: dict[int, asyncio.StreamWriter] = {}  # the connection a stream came on
        self._next = 0
        self._server: asyncio.AbstractServer | None = None
        self.frames_received = 0  # one per engine step per connected router, when busy

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("output channel inbox listening on %s:%d", self.host, self.port)

    @property
    def reply_to(self) -> ReplyTo:
        return ReplyTo(self.host, self.port, self.token)

    def open(self) -> tuple[int, asyncio.Queue]:
        self._next += 1
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[self._next] = queue
        return self._next, queue

    def close(self, stream: int) -> None:
        self._queues.pop(stream, None)
        self._writers.pop(stream, None)

    def abort(self, stream: int, request_ids: list[str]) -> None:
        """Tell the router running `stream` to stop these sequences (their records so far
        came on its connection, so it is known once the first one arrived)."""
        writer = self._writers.get(stream)
        if writer is not None and not writer.is_closing():
            body = encode_records([AbortRecord(stream, tuple(request_ids))])
            writer.write(frame_header(ABORT_MAGIC, 1, len(body)) + body)

    @property
    def num_open(self) -> int:
        return len(self._queues)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            if not await read_token(reader, self.token):
                log.warning("output channel: refused a connection from %s (bad token)", peer)
                return
            while True:
                _, body = await read_frame(reader, OUTPUT_MAGIC, MAX_FRAME)
                self.frames_received += 1
                for record in decode_records(body):
                    queue = self._queues.get(record.stream)
                    if queue is not None:
                        if record.stream not in self._writers:
                            self._writers[record.stream] = writer
                        queue.put_nowait(record)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError):
            pass  # the router went away; its Serve calls fail and say so
        except (WireError, ChannelError) as e:  # before ConnectionError: ChannelError is one
            log.error("output channel: dropping the connection from %s: %s", peer, e)
        except ConnectionError:
            pass  # the router went away
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


# --- the router's end ----------------------------------------------------------------------


class OutputSink:
    """One call's end on the router (a request's sequences): takes the engine's items on the
    event loop (the AsyncLLMEngine sink protocol) and queues them on its connection. `done`
    resolves when every sequence finished (or was aborted by the ingress) or the call failed
    in-band, and raises if the connection is lost. on_abort: stops a sequence in the engine."""

    __slots__ = ("conn", "stream", "live", "on_abort", "done", "finished")

    def __init__(self, conn: _Connection, stream: int, request_ids: list[str], on_abort: Callable):
        self.conn, self.stream, self.on_abort = conn, stream, on_abort
        self.live = set(request_ids)
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        self.finished = False

    def put_nowait(self, item: EngineOutput | EngineError) -> None:
        if self.done.done():
            return  # cancelled (aborted) or failed: nobody reads this stream any more
        if isinstance(item, EngineError):
            self.conn.push(ErrorRecord(self.stream, item))
            self._end()
            return
        if item.request_id not in self.live:
            return  # the ingress aborted it: it has what it needs
        self.conn.push(OutputRecord(self.stream, item))
        if item.finish_reason is not None:
            self.live.discard(item.request_id)
            if not self.live:
                self._end()

    def abort(self, request_ids: tuple[str, ...]) -> None:
        """The ingress's front end ended these sequences (a stop string matched)."""
        for rid in request_ids:
            if rid in self.live:
                self.live.discard(rid)
                self.on_abort(rid)
        if not self.live and not self.done.done():
            self._end()

    def _end(self) -> None:
        self.finished = True
        self.done.set_result(None)
        self.conn.sinks.pop(self.stream, None)

    def close(self) -> None:
        """Stop taking items (the request was refused or aborted)."""
        if not self.done.done():
            self.done.cancel()
        self.conn.sinks.pop(self.stream, None)


class _Connection:
    def __init__(self, reply: ReplyTo, on_lost):
        self.reply = reply
        self.sinks: dict[int, OutputSink] = {}  # by stream
        self.failed: BaseException | None = None
        self._records: list[Record] = []
        self._backlog: list[bytes] = []  # frames made before the connection was up
        self._writer: asyncio.StreamWriter | None = None
        self._flush_scheduled = False
        self._on_lost = on_lost
        self._task = asyncio.get_running_loop().create_task(self._run())

    def push(self, record: Record) -> None:
        """Queue a record; everything pushed in one event-loop turn (one engine step's
        delivery) leaves as one frame."""
        self._records.append(record)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._records or self.failed is not None:
            self._records = []
            return
        body = encode_records(self._records)
        frame = frame_header(OUTPUT_MAGIC, len(self._records), len(body)) + body
        self._records = []
        if self._writer is None:
            self._backlog.append(frame)
            return
        self._writer.write(frame)
        if self._writer.transport.get_write_buffer_size() > MAX_UNSENT_BYTES:
            self._lose(ConnectionError(f"ingress {self._addr} stopped reading"))

    @property
    def _addr(self) -> str:
        return str(self.reply)

    async def _run(self) -> None:
        try:
            reader, writer = await open_channel(self.reply)
            for frame in self._backlog:
                writer.write(frame)
            self._backlog = []
            self._writer = writer
            while True:  # the ingress writes only aborts; this ends when it hangs up
                try:
                    _, body = await read_frame(reader, ABORT_MAGIC, MAX_FRAME)
                except asyncio.IncompleteReadError:
                    closed = f"ingress {self._addr} closed the output channel"
                    raise ConnectionError(closed) from None
                for record in decode_records(body):
                    sink = self.sinks.get(record.stream)
                    if isinstance(record, AbortRecord) and sink is not None:
                        sink.abort(record.request_ids)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure ends this connection's requests
            if not isinstance(e, ConnectionError):
                e = ConnectionError(f"output channel to {self._addr}: {type(e).__name__}: {e}")
            self._lose(e)

    def _lose(self, error: BaseException) -> None:
        if self.failed is not None:
            return
        self.failed = error
        log.warning("%s", error)
        if self._writer is not None:
            self._writer.close()
        self._on_lost(self)
        for sink in list(self.sinks.values()):
            if not sink.done.done():
                sink.done.set_exception(error)
        self.sinks.clear()

    def close(self) -> None:
        self._task.cancel()
        if self._writer is not None:
            self._writer.close()


class OutputOutbox:
    """The router's connections, one per ingress replica that sent it requests."""

    def __init__(self) -> None:
        self._conns: dict[ReplyTo, _Connection] = {}

    def sink(
        self, reply: ReplyTo, stream: int, request_ids: list[str], on_abort: Callable
    ) -> OutputSink:
        conn = self._conns.get(reply)
        if conn is None:
            conn = self._conns[reply] = _Connection(reply, self._forget)
        sink = OutputSink(conn, stream, request_ids, on_abort)
        conn.sinks[stream] = sink
        return sink

    def _forget(self, conn: _Connection) -> None:
        if self._conns.get(conn.reply) is conn:
            del self._conns[conn.reply]

    @property
    def num_connections(self) -> int:
        return len(self._conns)

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()
