"""The router <-> ingress output channel: typed records, one frame per event-loop turn, the
ingress's aborts back, auth, loss.

Plain asyncio on 127.0.0.1: no Ray, no model."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.api.errors import http_status
from serve_app.deployments.output_channel import OutputInbox, OutputOutbox, ReplyTo
from serve_app.deployments.output_wire import (
    AbortRecord,
    ErrorRecord,
    OutputRecord,
    WireError,
    decode_records,
    encode_records,
)
from serve_app.engine.errors import ExpertsUnavailableError, InvalidRequestError
from serve_app.engine.outputs import (
    CompletionOutput,
    EngineOutput,
    RequestOutput,
    TokenLogprob,
    coalesce,
)


def out(rid: str, ids: list[int], finish: str | None = None) -> EngineOutput:
    lps = [TokenLogprob(t, -0.5, ((t, -0.5), (7, -1.0))) for t in ids]
    return EngineOutput(rid, ids, lps, finish, None, finish == "stop", 2)


def test_records_round_trip() -> None:
    a, b = out("r#0", [5]), out("r#1", [6, 7], "stop")
    a.prompt_logprobs = [None, TokenLogprob(2, -1.5, ((2, -1.5),)), TokenLogprob(3, None)]
    b.stop_reason = 7
    records = [OutputRecord(4, a), OutputRecord(5, b), AbortRecord(4, ("r#0", "r#2"))]
    assert decode_records(encode_records(records)) == records  # logprobs, finish, stop token...


def test_errors_keep_their_class_and_param() -> None:
    errors = [InvalidRequestError("too long", "prompt"), ExpertsUnavailableError("shard 1")]
    body = encode_records([ErrorRecord(i, e) for i, e in enumerate(errors)])
    (e1, e2) = (r.error for r in decode_records(body))
    assert isinstance(e1, InvalidRequestError) and e1.param == "prompt" and str(e1) == "too long"
    assert isinstance(e2, ExpertsUnavailableError)
    assert http_status(e2) == (503, "service_unavailable")


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"a": 1}',
        b"[[1, 2]]",
        b'[["o","x","r",[1],null,null,null,false,0,null]]',  # stream not a number
        b'[["o",1,"r",["a"],null,null,null,false,0,null]]',  # token ids not numbers
        b'[["a",1,[3]]]',
        b'[["z",1]]',
    ],
)
def test_malformed_frames_are_refused(body: bytes) -> None:
    with pytest.raises(WireError):
        decode_records(body)


def test_coalesce_joins_deltas_per_choice() -> None:
    def delta(i: int, text: str, ids: list[int], finish: str | None = None) -> RequestOutput:
        lps = [TokenLogprob(t, -0.5) for t in ids]
        c = CompletionOutput(i, text, ids, lps, finish)
        return RequestOutput("r", [1, 2, 3], [c], finish is not None, 2)

    parts = [delta(0, "a", [1]), delta(1, "x", [9]), delta(0, "b", [2], "stop")]
    m = coalesce(parts)
    assert m.finished and [c.index for c in m.outputs] == [0, 1]
    zero = m.outputs[0]
    assert (zero.text, zero.token_ids, zero.finish_reason) == ("ab", [1, 2], "stop")
    assert [lp.token_id for lp in zero.logprobs] == [1, 2]
    assert parts[0].outputs[0].token_ids == [1]  # the inputs are not modified
    assert coalesce(parts[:1]) is parts[0]


async def _recv(queue: asyncio.Queue, n: int) -> list[OutputRecord]:
    return [await asyncio.wait_for(queue.get(), 5) for _ in range(n)]


def _no_abort(rid: str) -> None:
    raise AssertionError(f"unexpected abort of {rid}")


async def test_one_frame_carries_every_stream_of_a_turn() -> None:
    inbox = OutputInbox("127.0.0.1")
    await inbox.start()
    outbox = OutputOutbox()
    try:
        (s1, q1), (s2, q2) = inbox.open(), inbox.open()
        k1 = outbox.sink(inbox.reply_to, s1, ["a"], _no_abort)
        k2 = outbox.sink(inbox.reply_to, s2, ["b"], _no_abort)
        for step in range(3):  # three engine steps, each delivered in one loop turn
            k1.put_nowait(out("a", [step], "length" if step == 2 else None))
            k2.put_nowait(out("b", [10 + step]))
            await asyncio.sleep(0.05)
        got1, got2 = await _recv(q1, 3), await _recv(q2, 3)
        assert [r.output.new_token_ids for r in got1] == [[0], [1], [2]]
        assert [r.output.new_token_ids for r in got2] == [[10], [11], [12]]
        assert got1[-1].output.finish_reason == "length"
        assert inbox.frames_received == 3 and outbox.num_connections == 1
        assert k1.finished and k1.done.done() and not k2.done.done()
        inbox.close(s2)  # a closed stream's records are dropped
        k2.put_nowait(out("b", [9]))
        await asyncio.sleep(0.05)
        assert q2.empty()
    finally:
        outbox.close()
        await inbox.stop()


async def test_an_abort_from_the_ingress_reaches_the_routers_engine() -> None:
    """A stop string ended sequence r#0 in the ingress's front end: the router stops it (and
    sends nothing more of it); the call ends once r#1 finishes too."""
    inbox = OutputInbox("127.0.0.1")
    await inbox.start()
    outbox = OutputOutbox()
    aborted: list[str] = []
    try:
        stream, queue = inbox.open()
        sink = outbox.sink(inbox.reply_to, stream, ["r#0", "r#1"], aborted.append)
        sink.put_nowait(out("r#0", [1]))
        sink.put_nowait(out("r#1", [2]))
        await _recv(queue, 2)
        inbox.abort(stream, ["r#0"])
        for _ in range(100):
            if aborted:
                break
            await asyncio.sleep(0.02)
        assert aborted == ["r#0"] and not sink.done.done()
        sink.put_nowait(out("r#0", [3]))  # the engine ran ahead: not sent
        sink.put_nowait(out("r#1", [4], "length"))
        (last,) = await _recv(queue, 1)
        assert last.output.request_id == "r#1" and queue.empty()
        assert sink.finished and sink.done.done()
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
        sink = outbox.sink(forged, stream, ["a"], _no_abort)
        sink.put_nowait(out("a", [1]))
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
    sink = outbox.sink(ReplyTo("127.0.0.1", port, "0" * 32), 1, ["a"], _no_abort)
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(sink.done, 15)
    outbox.close()
