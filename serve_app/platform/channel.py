"""The one framing and connection/auth helper of moeserve's two TCP channels.

Both hand-written channels (the expert channel, router <-> shard, serve_app.experts.channel;
the output channel, router <-> ingress, serve_app.deployments.output_channel) speak this:

  connection = token (TOKEN_BYTES ASCII hex characters, sent first by the connecting side)
               | frame | frame | ...
  frame      = "<4sIQ" (magic, word, n) | n bytes of body

`magic` names the message type and its version (b"MXQ1": expert call v1, ...); a frame whose
magic is not the one expected, or whose body is larger than the reader allows, is a
ChannelError: the connection is dropped, never guessed at. The body is a typed message's own
encoding (binary arrays, or JSON): nothing read from a socket is ever unpickled.

The server side makes the token (`new_token`), hands its `ChannelAddress` to peers over Ray,
and checks each connection's first TOKEN_BYTES against it (`token_ok`). Blocking helpers serve
the expert channel's threads; asyncio ones the output channel's event loops.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import struct
from dataclasses import dataclass

FRAME = struct.Struct("<4sIQ")
TOKEN_BYTES = 32  # hex characters of a connection's token
CONNECT_TIMEOUT_S = 10.0  # connecting, and the token after it
MAX_FRAME = 1 << 32  # 4 GiB: the largest body any channel accepts (each may ask for less)


class ChannelError(ConnectionError):
    """The connection is gone or spoke something other than the expected frames."""


@dataclass(frozen=True, slots=True)
class ChannelAddress:
    """Where a channel's server listens, and the token a peer must send first."""

    host: str
    port: int
    token: str

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def new_token() -> str:
    return secrets.token_hex(TOKEN_BYTES // 2)


def token_ok(hello: bytes | bytearray, token: str) -> bool:
    return secrets.compare_digest(bytes(hello), token.encode())


def frame_header(magic: bytes, word: int, size: int) -> bytes:
    return FRAME.pack(magic, word, size)


def parse_header(header: bytes | bytearray, magic: bytes, max_size: int) -> tuple[int, int]:
    """-> (word, body size); ChannelError for another magic or a body past max_size."""
    got, word, size = FRAME.unpack(header)
    if got != magic or size > max_size:
        raise ChannelError(f"bad frame (magic {got!r}, expected {magic!r}, {size} bytes)")
    return word, size


# --- blocking sockets (the expert channel's threads) ----------------------------------------


def connect(address: ChannelAddress, timeout_s: float = CONNECT_TIMEOUT_S) -> socket.socket:
    """A connection to `address` that has sent its token; ChannelError if none can be made."""
    try:
        sock = socket.create_connection((address.host, address.port), timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(address.token.encode())
    except OSError as e:
        raise ChannelError(f"channel {address}: {e}") from e
    return sock


def accept_token(conn: socket.socket, token: str) -> bool:
    """Read a new connection's token (within CONNECT_TIMEOUT_S); True if it is `token`."""
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.settimeout(CONNECT_TIMEOUT_S)
    ok = token_ok(recv_exact(conn, TOKEN_BYTES), token)
    conn.settimeout(None)
    return ok


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ChannelError("connection closed by the peer")
        got += k
    return buf


def recv_frame(
    sock: socket.socket, magic: bytes, max_size: int = MAX_FRAME
) -> tuple[int, bytearray]:
    word, size = parse_header(recv_exact(sock, FRAME.size), magic, max_size)
    return word, recv_exact(sock, size)


def send_frame(sock: socket.socket, magic: bytes, word: int, body: bytes) -> None:
    """Header and body in one sendmsg (no copy of the body to glue them); the rest, if the
    socket took only part of it, with sendall."""
    header = frame_header(magic, word, len(body))
    sent = sock.sendmsg([header, body])
    if sent < len(header):
        sock.sendall(header[sent:])
        sent = len(header)
    if sent - len(header) < len(body):
        sock.sendall(memoryview(body)[sent - len(header) :])


# --- asyncio streams (the output channel's event loops) -------------------------------------


async def open_channel(
    address: ChannelAddress,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """connect() on an event loop: the token is written before anything else."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(address.host, address.port), CONNECT_TIMEOUT_S
    )
    writer.write(address.token.encode())
    return reader, writer


async def read_token(reader: asyncio.StreamReader, token: str) -> bool:
    """accept_token() on an event loop."""
    hello = await asyncio.wait_for(reader.readexactly(TOKEN_BYTES), CONNECT_TIMEOUT_S)
    return token_ok(hello, token)


async def read_frame(
    reader: asyncio.StreamReader, magic: bytes, max_size: int = MAX_FRAME
) -> tuple[int, bytes]:
    """The next frame's (word, body); asyncio.IncompleteReadError when the peer hung up."""
    word, size = parse_header(await reader.readexactly(FRAME.size), magic, max_size)
    return word, await reader.readexactly(size)
