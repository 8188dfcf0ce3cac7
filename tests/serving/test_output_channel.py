"""The router -> ingress output channel: wire form, one frame per event-loop turn, auth, loss.

Plain asyncio on 127.0.0.1: no Ray, no model."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.api.errors import http_status
from serve_app.deployments.output_channel import OutputInbox, OutputOutbox, ReplyTo
from serve_app.deployments.output_wire import (
    ErrorRecord,
    OutputRecord,
    WireError,
    decode_records,
    encode_records,
)
from serve_app.engine.errors import ExpertsUnavailableError, InvalidRequestError
from serve_app.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob, coalesce


def out(rid: str, i: int, text: str, ids: list[int], finish: str | None = None) -> RequestOutput:
    lps = [TokenLogprob(t, -0.5, ((t, -0.5), (7, -1.0))) for t in ids]
    return RequestOutput(
        rid, [1, 2, 3], [CompletionOutput(i, text, ids, lps, finish)], finish is not None, 2
    )


def test_records_round_trip() -> None:
    a, b = out("", 0, "he", [5]), out("", 0, "llo", [6, 7], "length")
    a.prompt_logprobs = [None, TokenLogprob(2, -1.5, ((2, -1.5),)), TokenLogprob(3, None)]
    records = [OutputRecord(4, a), OutputRecord(5, b)]
    assert decode_records(encode_records(records)) == records  # logprobs, finish, cached...


def test_errors_keep_their_class_and_param() -> None:
    body = encode_records(
        [
            ErrorRecord(1, InvalidRequestError("too long", "prompt")),
            ErrorRecord(2, ExpertsUnavailableError("shard 1")),
        ]
    )
    (e1, e2) = (r.error for r in decode_records(body))
    assert isinstance(e1, InvalidRequestError) and e1.param == "prompt" and str(e1) == "too long"
    assert isinstance(e2, ExpertsUnavailableError)
    assert http_status(e2) == (503, "service_unavailable")


@pytest.mark.parametrize(
    "body", [b"not json", b'{"a": 1}', b"[[1, 2]]", b'[["o","x",null,0,0,[],null]]', b'[["z",1]]']
)
def test_malformed_frames_are_refused(body: bytes) -> None:
    with pytest.raises(WireError):
        decode_records(body)


def test_coalesce_joins_deltas_per_choice() -> None:
    parts = [out("r", 0, "a", [1]), out("r", 1, "x", [9]), out("r", 0, "b", [2], "stop")]
    m = coalesce(parts)
    assert m.finished and [c.index for c in m.outputs] == [0, 1]
    zero = m.outputs[0]
    assert (zero.text, zero.token_ids, zero.finish_reason) == ("ab", [1, 2], "stop")
    assert [lp.token_id for lp in zero.logprobs] == [1, 2]
    assert parts[0].outputs[0].token_ids == [1]  # the inputs are not modified
    assert coalesce(parts[:1]) is parts[0]


async def _recv(queue: asyncio.Queue, n: int) -> list[OutputRecord]:
    return [await asyncio.wait_for(queue.get(), 5) for _ in range(n)]


async def test_one_frame_carries_every_stream_of_a_turn() -> None:
    inbox = OutputInbox("127.0.0.1")
    await inbox.start()
    outbox = OutputOutbox()
    try:
        (s1, q1), (s2, q2) = inbox.open(), inbox.open()
        k1, k2 = outbox.sink(inbox.reply_to, s1), outbox.sink(inbox.reply_to, s2)
        for step in range(3):  # three engine steps, each delivered in one loop turn
            k1.put_nowait(out("a", 0, f"a{step}", [step], "length" if step == 2 else None))
            k2.put_nowait(out("b", 0, f"b{step}", [step]))
            await asyncio.sleep(0.05)
        got1, got2 = await _recv(q1, 3), await _recv(q2, 3)
        assert [r.output.outputs[0].text for r in got1] == ["a0", "a1", "a2"]
        assert [r.output.outputs[0].text for r in got2] == ["b0", "b1", "b2"]
        # the prompt travels once, in a stream's first record
        assert (
            got1[0].output.prompt_token_ids == [1, 2, 3] and got1[1].output.prompt_token_ids == []
        )
        assert inbox.frames_received == 3 and outbox.num_connections == 1
        assert k1.finished and k1.done.done() and not k2.done.done()
        inbox.close(s2)  # a closed stream's records are dropped
        k2.put_nowait(out("b", 0, "late", [9]))
        await asyncio.sleep(0.05)
        assert q2.empty()
    finally:
        outbox.close()
        await inbox.stop()


async def test_a_wrong_token_is_refused_and_its_requests_fail() -> None:
    inbox = OutputInbox("127.0.0.1")
    await inbox.start()
    outbox = OutputOutbox()
    try:
        stream, queue = inbox.open()
        forged = ReplyTo("127.0.0.1", inbox.port, "0" * 32)
        sink = outbox.sink(forged, stream)
        sink.put_nowait(out("a", 0, "x", [1]))
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(sink.done, 5)
        assert queue.empty() and outbox.num_connections == 0
    finally:
        outbox.close()
        await inbox.stop()


async def test_an_unreachable_ingress_fails_the_sink() -> None:
    inbox = OutputInbox("127.0.0.1")
    await inbox.start()
    port = inbox.port
    await inbox.stop()
    outbox = OutputOutbox()
    sink = outbox.sink(ReplyTo("127.0.0.1", port, "0" * 32), 1)
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(sink.done, 15)
    outbox.close()
