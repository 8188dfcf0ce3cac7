"""The output channel's messages: typed records, JSON on the wire, many per frame
(serve_app.platform.channel's framing; the magic names the form and its version).

Router -> ingress, magic b"MOU2" (token outputs, version 2), a JSON array of records:

    OutputRecord  ["o", stream, request_id, new_token_ids, logprobs | null, finish_reason,
                   stop_reason, stop_token, num_cached_tokens, prompt_logprobs | null]
                  logprob = [token_id, logprob | null, [[token_id, logprob], ...]]
    ErrorRecord   ["e", stream, type name, message, param]

Ingress -> router, magic b"MAB1" (aborts, version 1), a JSON array of records:

    AbortRecord   ["a", stream, [request_id, ...]]   (a stop string ended these sequences)

`stream` is the number the ingress gave the call (unique per ingress, unlike request ids, which
clients choose). No text crosses: the engine's token ids and logprob ids do, and the ingress's
front end makes the text. Only JSON: nothing received is unpickled, and a body of another form
is a WireError. Pure; no sockets here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from serve_app.engine import errors
from serve_app.engine.outputs import EngineOutput, TokenLogprob
from serve_app.rollout.faults import InjectedFaultError

OUTPUT_MAGIC = b"MOU2"  # router -> ingress: token outputs, version 2
ABORT_MAGIC = b"MAB1"  # ingress -> router: aborts, version 1
MAX_FRAME = 64 << 20  # a frame past this is a protocol error, not a bigger buffer
_ERRORS = {
    cls.__name__: cls
    for cls in (
        errors.EngineError,
        errors.InvalidRequestError,
        errors.EngineOverloadedError,
        errors.EngineDeadError,
        errors.ExpertsUnavailableError,
        InjectedFaultError,
    )
}


class WireError(ValueError):
    """A frame that is not of this form (never a reason to guess)."""


@dataclass(frozen=True, slots=True)
class OutputRecord:
    """One sequence's token output of one engine step."""

    stream: int
    output: EngineOutput


@dataclass(frozen=True, slots=True)
class ErrorRecord:
    """The call failed; nothing follows."""

    stream: int
    error: errors.EngineError


@dataclass(frozen=True, slots=True)
class AbortRecord:
    """The ingress's front end ended these sequences of the call (a stop string matched)."""

    stream: int
    request_ids: tuple[str, ...]


Record = OutputRecord | ErrorRecord | AbortRecord


def encode_records(records: list[Record]) -> bytes:
    return json.dumps(
        [_record_out(r) for r in records], ensure_ascii=False, separators=(",", ":")
    ).encode()


def decode_records(body: bytes) -> list[Record]:
    try:
        items = json.loads(body)
        if not isinstance(items, list):
            raise TypeError("not a list")
        return [_record_in(item) for item in items]
    except (ValueError, TypeError, KeyError) as e:
        raise WireError(f"not a frame of output channel records: {e}") from None


def _record_out(r: Record) -> list:
    if isinstance(r, OutputRecord):
        o = r.output
        lps = None if o.new_logprobs is None else [_logprob_out(lp) for lp in o.new_logprobs]
        prompt_lps = None
        if o.prompt_logprobs is not None:
            prompt_lps = [None if lp is None else _logprob_out(lp) for lp in o.prompt_logprobs]
        return [
            "o",
            r.stream,
            o.request_id,
            o.new_token_ids,
            lps,
            o.finish_reason,
            o.stop_reason,
            o.stop_token,
            o.num_cached_tokens,
            prompt_lps,
        ]
    if isinstance(r, ErrorRecord):
        param = getattr(r.error, "param", None)
        return ["e", r.stream, type(r.error).__name__, str(r.error), param]
    return ["a", r.stream, list(r.request_ids)]


def _record_in(item: list) -> Record:
    kind, stream, *fields = item
    if not isinstance(stream, int):
        raise TypeError(f"stream {stream!r}")
    if kind == "o":
        rid, ids, lps, finish, stop, stop_token, cached, prompt_lps = fields
        if not isinstance(rid, str) or not all(isinstance(t, int) for t in ids):
            raise TypeError("request id or token ids")
        if lps is not None:
            lps = [_logprob_in(lp) for lp in lps]
        if prompt_lps is not None:
            prompt_lps = [None if lp is None else _logprob_in(lp) for lp in prompt_lps]
        out = EngineOutput(rid, ids, lps, finish, stop, bool(stop_token), cached, prompt_lps)
        return OutputRecord(stream, out)
    if kind == "e":
        name, message, param = fields
        cls = _ERRORS.get(name, errors.EngineError)
        error = cls(message, param) if cls is errors.InvalidRequestError else cls(message)
        return ErrorRecord(stream, error)
    if kind == "a":
        (ids,) = fields
        if not all(isinstance(rid, str) for rid in ids):
            raise TypeError("request ids")
        return AbortRecord(stream, tuple(ids))
    raise ValueError(f"record kind {kind!r}")


def _logprob_out(lp: TokenLogprob) -> list:
    return [lp.token_id, lp.logprob, lp.top]


def _logprob_in(lp: list) -> TokenLogprob:
    token_id, logprob, top = lp
    return TokenLogprob(token_id, logprob, tuple(map(tuple, top)))
