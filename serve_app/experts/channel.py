"""Router <-> expert shard data plane: one TCP connection per (router, shard), one frame per
MoE call each way.

Why: a Ray actor call costs ~3.4 ms per round trip to two shards on a 2-core node (task
submission, the core worker's threads, the object store above 100 KB; docs/transport.md), and a
decode step makes one per MoE layer. On this socket a round trip is a send and a receive per
shard. Ray still creates, places, restarts and health-checks the shards; only the layer calls take
this path (the way the router's outputs take serve_app.deployments.output_channel).

A shard listens on its node's address (a free port) and hands its address and a random token to
routers over Ray (`ExpertShardActor.channel_address`); a router sends the token first. Frames:

  request  = "<4sIQ" (b"MXQ1", layer, n) | n bytes: serve_app.experts.wire.encode_request
  response = "<4sIQ" (b"MXA1", status, n) | n bytes: encode_response (status 0) or a UTF-8
             error message (status 1: the shard refused, e.g. an expert it does not hold)

Never pickle. One thread per connection reads frames; one compute thread runs them in arrival
order, so a shard has one OpenMP team whatever the number of routers.
"""

from __future__ import annotations

import logging
import queue
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

FRAME = struct.Struct("<4sIQ")
REQUEST_MAGIC = b"MXQ1"
RESPONSE_MAGIC = b"MXA1"
OK, REFUSED = 0, 1
TOKEN_BYTES = 32  # hex characters
MAX_FRAME = 1 << 32  # 4 GiB: far above a prefill chunk's hidden states
CONNECT_TIMEOUT_S = 10.0

# (layer, request body) -> response body; raises ValueError to refuse the call
Handler = Callable[[int, memoryview], bytes]


class ChannelError(ConnectionError):
    """The connection to a shard is gone or spoke garbage: re-resolve the shard and resend."""


class ShardRefused(Exception):
    """The shard answered the call with an error (status 1)."""


@dataclass(frozen=True, slots=True)
class ChannelAddress:
    host: str
    port: int
    token: str


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ChannelError("connection closed by the peer")
        got += k
    return buf


def _recv_frame(sock: socket.socket, magic: bytes) -> tuple[int, bytearray]:
    got, word, size = FRAME.unpack(_recv_exact(sock, FRAME.size))
    if got != magic or size > MAX_FRAME:
        raise ChannelError(f"bad frame (magic {got!r}, {size} bytes)")
    return word, _recv_exact(sock, size)


def _send_frame(sock: socket.socket, magic: bytes, word: int, body: bytes) -> None:
    """Header and body in one sendmsg (no copy of the body to glue them); the rest, if the
    socket took only part of it, with sendall."""
    header = FRAME.pack(magic, word, len(body))
    sent = sock.sendmsg([header, body])
    if sent < len(header):
        sock.sendall(header[sent:])
        sent = len(header)
    if sent - len(header) < len(body):
        sock.sendall(memoryview(body)[sent - len(header) :])


# --- the shard's end ------------------------------------------------------------------------


class ShardServer:
    """Serves `handler` to every router that connects with the token."""

    def __init__(
        self, handler: Handler, host: str, on_compute_start: Callable[[], None] | None = None
    ):
        self.handler = handler
        self.token = secrets.token_hex(TOKEN_BYTES // 2)
        self._listener = socket.create_server((host, 0))
        self.address = ChannelAddress(host, self._listener.getsockname()[1], self.token)
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._on_compute_start = on_compute_start
        self.calls_served = 0
        self._conns: set[socket.socket] = set()
        self._threads = [
            threading.Thread(target=target, name=f"moeserve-expert-{name}", daemon=True)
            for target, name in ((self._accept, "accept"), (self._compute, "compute"))
        ]
        for t in self._threads:
            t.start()

    def _start_reader(self, conn: socket.socket) -> None:
        """Only the accept thread calls this (one writer of _threads)."""
        t = threading.Thread(target=self._read, args=(conn,), name="moeserve-expert-read")
        t.daemon = True
        self._threads = [*(x for x in self._threads if x.is_alive()), t]
        t.start()

    def threads_alive(self) -> list[str]:
        """The names of this server's threads still running (none soon after close())."""
        return [t.name for t in self._threads if t.is_alive()]

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            if self._closed:
                conn.close()
                return
            self._conns.add(conn)
            self._start_reader(conn)

    def _read(self, conn: socket.socket) -> None:
        """One router's calls, in order, onto the compute queue."""
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            conn.settimeout(CONNECT_TIMEOUT_S)
            hello = _recv_exact(conn, TOKEN_BYTES)
            if not secrets.compare_digest(bytes(hello), self.token.encode()):
                log.warning("expert channel: refused a connection (bad token)")
                conn.close()
                return
            conn.settimeout(None)
            while True:
                layer, body = _recv_frame(conn, REQUEST_MAGIC)
                self._calls.put((conn, layer, body))
        except (OSError, ChannelError):
            conn.close()  # the router went away or sent garbage; it reconnects if it lives
        finally:
            self._conns.discard(conn)

    def _compute(self) -> None:
        if self._on_compute_start is not None:
            self._on_compute_start()
        while True:
            conn, layer, body = self._calls.get()
            if conn is None:
                return
            try:
                status, out = OK, self.handler(layer, memoryview(body))
            except ValueError as e:
                status, out = REFUSED, str(e).encode()
            except Exception as e:  # noqa: BLE001 - report it to the caller, keep serving
                log.exception("expert call failed")
                status, out = REFUSED, f"{type(e).__name__}: {e}".encode()
            self.calls_served += 1
            try:
                _send_frame(conn, RESPONSE_MAGIC, status, out)
            except OSError:
                conn.close()

    def close(self) -> None:
        """Stop listening and end every thread: the compute thread after the calls queued,
        the readers by dropping the routers' connections. shutdown() before close(): on Linux
        close() alone wakes no thread blocked on the socket (an accept() kept listening, and
        accepting, after close)."""
        self._closed = True
        for sock in [self._listener, *list(self._conns)]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already gone
        self._listener.close()
        self._calls.put((None, 0, b""))


# --- the router's end -----------------------------------------------------------------------


class ShardLink:
    """A router's blocking connection to one shard; used by one thread (the engine's)."""

    def __init__(self, address: ChannelAddress, timeout_s: float = CONNECT_TIMEOUT_S):
        try:
            self.sock = socket.create_connection((address.host, address.port), timeout_s)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.sendall(address.token.encode())
        except OSError as e:
            raise ChannelError(f"expert channel {address.host}:{address.port}: {e}") from e

    def send(self, layer: int, body: bytes) -> None:
        try:
            self.sock.settimeout(CONNECT_TIMEOUT_S)
            _send_frame(self.sock, REQUEST_MAGIC, layer, body)
        except OSError as e:
            raise ChannelError(f"send failed: {e}") from e

    def receive(self, deadline: float) -> bytearray:
        """The answer to the oldest call sent; TimeoutError past `deadline` (monotonic),
        ShardRefused if the shard refused it, ChannelError if the connection is gone."""
        try:
            self.sock.settimeout(max(1e-3, deadline - time.monotonic()))
            status, body = _recv_frame(self.sock, RESPONSE_MAGIC)
        except TimeoutError:
            raise
        except OSError as e:
            raise ChannelError(f"receive failed: {e}") from e
        if status != OK:
            raise ShardRefused(bytes(body).decode(errors="replace"))
        return body

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
