"""The expert channel (router <-> shard layer calls over TCP) on real sockets, without Ray:
answers in order, refusals, the token, a dead shard and a silent one."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from serve_app.experts.channel import (
    ChannelAddress,
    ChannelError,
    ShardLink,
    ShardRefused,
    ShardServer,
)
from serve_app.experts.wire import decode_request, decode_response, encode_request, encode_response
from serve_app.platform.channel import TOKEN_BYTES


def doubling(layer: int, body: memoryview) -> bytes:
    """A stand-in shard: y = 2 * x + layer; refuses layer 99."""
    if layer == 99:
        raise ValueError("expert shard does not hold experts [7]")
    x, _, _ = decode_request(body)
    return encode_response(2 * x + layer)


def request(t: int, d: int = 8, seed: int = 0) -> tuple[np.ndarray, bytes]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, d)).astype(np.float32)
    ids = rng.integers(0, 4, (t, 2)).astype(np.int64)
    w = rng.random((t, 2)).astype(np.float32)
    return x, encode_request(x, ids, w)


def test_calls_are_answered_in_order_from_two_routers() -> None:
    server = ShardServer(doubling, "127.0.0.1")
    links = [ShardLink(server.address), ShardLink(server.address)]
    deadline = time.monotonic() + 10
    sent = []
    for i, t in enumerate([1, 5, 300, 4096]):  # up to 128 KB per call
        x, body = request(t, seed=i)
        link = links[i % 2]
        link.send(i, body)
        sent.append((link, x, i))
    for link, x, layer in sent:
        y = decode_response(link.receive(deadline))
        np.testing.assert_array_equal(y, 2 * x + layer)
    assert server.calls_served == 4
    for link in links:
        link.close()
    server.close()


def test_a_refusal_is_an_answer_and_the_link_stays_usable() -> None:
    server = ShardServer(doubling, "127.0.0.1")
    link = ShardLink(server.address)
    x, body = request(3)
    link.send(99, body)
    with pytest.raises(ShardRefused, match="does not hold experts"):
        link.receive(time.monotonic() + 10)
    link.send(1, body)
    np.testing.assert_array_equal(decode_response(link.receive(time.monotonic() + 10)), 2 * x + 1)
    link.close()
    server.close()


def test_a_wrong_token_gets_no_answer() -> None:
    server = ShardServer(doubling, "127.0.0.1")
    a = server.address
    link = ShardLink(ChannelAddress(a.host, a.port, "0" * TOKEN_BYTES))
    _, body = request(2)
    with pytest.raises(ChannelError):  # the shard hangs up on it
        link.send(0, body)
        link.receive(time.monotonic() + 10)
    assert server.calls_served == 0
    link.close()
    server.close()


def test_a_shard_that_dies_mid_call_is_a_channel_error() -> None:
    """A listener that takes the call and closes the connection, as a killed process does."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def die() -> None:
        conn, _ = listener.accept()
        conn.recv(TOKEN_BYTES + 64)
        conn.close()

    threading.Thread(target=die, daemon=True).start()
    link = ShardLink(ChannelAddress("127.0.0.1", port, "a" * TOKEN_BYTES))
    link.send(0, request(2)[1])
    with pytest.raises(ChannelError):
        link.receive(time.monotonic() + 10)
    link.close()
    listener.close()


def test_nothing_listening_is_a_channel_error() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()
    with pytest.raises(ChannelError):
        ShardLink(ChannelAddress("127.0.0.1", port, "a" * TOKEN_BYTES))


def test_a_silent_shard_times_out_at_the_deadline() -> None:
    release = threading.Event()

    def stuck(layer: int, body: memoryview) -> bytes:
        release.wait(10)
        return doubling(layer, body)

    server = ShardServer(stuck, "127.0.0.1")
    link = ShardLink(server.address)
    link.send(0, request(2)[1])
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        link.receive(t0 + 0.3)
    assert 0.2 < time.monotonic() - t0 < 5
    release.set()
    link.close()
    server.close()


def test_a_prefill_sized_call_crosses_whole() -> None:
    """16 MiB each way: the socket takes it in parts, and every byte arrives in order."""
    server = ShardServer(doubling, "127.0.0.1")
    link = ShardLink(server.address)
    x, body = request(8192, d=512, seed=3)
    link.send(2, body)
    np.testing.assert_array_equal(decode_response(link.receive(time.monotonic() + 30)), 2 * x + 2)
    link.close()
    server.close()


def test_a_closed_server_stops_listening_and_its_threads_end() -> None:
    """close() wakes the accept thread (on Linux closing a listener does not wake an accept()
    blocked on it: the thread stayed, and so did the listening socket, taking connections)."""
    server = ShardServer(doubling, "127.0.0.1")
    link = ShardLink(server.address)
    link.send(0, request(1)[1])
    link.receive(time.monotonic() + 10)
    link.close()
    server.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and server.threads_alive():
        time.sleep(0.01)
    assert server.threads_alive() == []
    with pytest.raises(ChannelError):
        ShardLink(server.address)
