"""Router <-> expert shard data plane: one TCP connection per (router, shard), one frame per
MoE call each way.

Why: a Ray actor call costs ~3.4 ms per round trip to two shards on a 2-core node (task
submission, the core worker's threads, the object store above 100 KB; docs/transport.md), and a
decode step makes one per MoE layer. On this socket a round trip is a send and a receive per
shard. Ray still creates, places, restarts and health-checks the shards; only the layer calls take
this path (the way the router's outputs take serve_app.deployments.output_channel).

A shard listens on its node's address (a free port) and hands its address and a random token to
routers over Ray (`ExpertShardActor.channel_address`); a router sends the token first. The
framing, the token and the timeouts are the output channel's too (serve_app.platform.channel):

  request  = frame (b"MXQ1", layer, n) | n bytes: serve_app.experts.wire.encode_request
  response = frame (b"MXA1", status, n) | n bytes: encode_response (status 0) or a UTF-8
             error message (status 1: the shard refused, e.g. an expert it does not hold)

Never pickle. One thread per connection reads frames; one compute thread runs them in arrival
order, so a shard has one OpenMP team whatever the number of routers.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections.abc import Callable

from serve_app.platform.channel import (
    CONNECT_TIMEOUT_S,
    ChannelAddress,
    ChannelError,
    accept_token,
    connect,
    new_token,
    recv_frame,
    send_frame,
)

log = logging.getLogger(__name__)

REQUEST_MAGIC = b"MXQ1"  # an expert call, version 1
RESPONSE_MAGIC = b"MXA1"  # its answer, version 1
OK, REFUSED = 0, 1

# (layer, request body) -> response body; raises ValueError to refuse the call
Handler = Callable[[int, memoryview], bytes]

__all__ = ["ChannelAddress", "ChannelError", "ShardLink", "ShardRefused", "ShardServer"]


class ShardRefused(Exception):
    """The shard answered the call with an error (status 1)."""


# --- the shard's end ------------------------------------------------------------------------


class ShardServer:
    """Serves `handler` to every router that connects with the token."""

    def __init__(
        self, handler: Handler, host: str, on_compute_start: Callable[[], None] | None = None
    ):
        self.handler = handler
        self.token = new_token()
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
        try:
            if not accept_token(conn, self.token):
                log.warning("expert channel: refused a connection (bad token)")
                conn.close()
                return
            while True:
                layer, body = recv_frame(conn, REQUEST_MAGIC)
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
                send_frame(conn, RESPONSE_MAGIC, status, out)
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
        self.sock = connect(address, timeout_s)

    def send(self, layer: int, body: bytes) -> None:
        try:
            self.sock.settimeout(CONNECT_TIMEOUT_S)
            send_frame(self.sock, REQUEST_MAGIC, layer, body)
        except OSError as e:
            raise ChannelError(f"send failed: {e}") from e

    def receive(self, deadline: float) -> bytearray:
        """The answer to the oldest call sent; TimeoutError past `deadline` (monotonic),
        ShardRefused if the shard refused it, ChannelError if the connection is gone."""
        try:
            self.sock.settimeout(max(1e-3, deadline - time.monotonic()))
            status, body = recv_frame(self.sock, RESPONSE_MAGIC)
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
