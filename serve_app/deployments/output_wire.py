"""The router -> ingress output channel's messages: typed records, JSON on the wire, many per
frame (serve_app.platform.channel's framing; magic b"MOU1" names this form, version 1).

A frame's body is a JSON array, one entry per record, `[kind, stream, ...fields]`:

    OutputRecord  ["o", stream, prompt_token_ids | null, finished, num_cached_tokens, choices,
                   prompt_logprobs | null]
                  choice = [index, text, token_ids, logprobs | null, finish_reason, stop_reason]
                  logprob = [token_id, logprob | null, [[token_id, logprob], ...]]
    ErrorRecord   ["e", stream, type name, message, param]

`stream` is the number the ingress gave the request (unique per ingress, unlike request ids,
which clients choose). The prompt's token ids travel once, in a request's first record. Only
JSON: nothing received is unpickled, and a body of another form is a WireError. Pure; no
sockets here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from serve_app.engine import errors
from serve_app.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from serve_app.rollout.faults import InjectedFaultError

MAGIC = b"MOU1"  # output records, version 1
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
    """One increment of a request; `output.prompt_token_ids` is empty after its first record
    and `output.request_id` is the ingress's to fill in (the stream number identifies it)."""

    stream: int
    output: RequestOutput


@dataclass(frozen=True, slots=True)
class ErrorRecord:
    """The request failed; nothing follows."""

    stream: int
    error: errors.EngineError


Record = OutputRecord | ErrorRecord


def encode_records(records: list[Record]) -> bytes:
    body = [_output_out(r) if isinstance(r, OutputRecord) else _error_out(r) for r in records]
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def decode_records(body: bytes) -> list[Record]:
    try:
        items = json.loads(body)
        if not isinstance(items, list):
            raise TypeError("not a list")
        return [_record_in(item) for item in items]
    except (ValueError, TypeError, KeyError) as e:
        raise WireError(f"not a frame of output records: {e}") from None


def _output_out(r: OutputRecord) -> list:
    out = r.output
    choices = [
        [c.index, c.text, c.token_ids, _logprobs_out(c.logprobs), c.finish_reason, c.stop_reason]
        for c in out.outputs
    ]
    prompt_lps = None
    if out.prompt_logprobs is not None:
        prompt_lps = [None if lp is None else _logprob_out(lp) for lp in out.prompt_logprobs]
    prompt = out.prompt_token_ids or None
    return ["o", r.stream, prompt, out.finished, out.num_cached_tokens, choices, prompt_lps]


def _error_out(r: ErrorRecord) -> list:
    return ["e", r.stream, type(r.error).__name__, str(r.error), getattr(r.error, "param", None)]


def _record_in(item: list) -> Record:
    kind, stream, *fields = item
    if not isinstance(stream, int):
        raise TypeError(f"stream {stream!r}")
    if kind == "e":
        name, message, param = fields
        cls = _ERRORS.get(name, errors.EngineError)
        error = cls(message, param) if cls is errors.InvalidRequestError else cls(message)
        return ErrorRecord(stream, error)
    if kind != "o":
        raise ValueError(f"record kind {kind!r}")
    prompt, finished, cached, choices, prompt_lps = fields
    outs = [
        CompletionOutput(index, text, token_ids, _logprobs_in(lps), finish, stop)
        for index, text, token_ids, lps, finish, stop in choices
    ]
    if prompt_lps is not None:
        prompt_lps = [None if lp is None else _logprob_in(lp) for lp in prompt_lps]
    output = RequestOutput("", prompt or [], outs, finished, cached, prompt_lps)
    return OutputRecord(stream, output)


def _logprob_out(lp: TokenLogprob) -> list:
    return [lp.token_id, lp.logprob, lp.top]


def _logprob_in(lp: list) -> TokenLogprob:
    token_id, logprob, top = lp
    return TokenLogprob(token_id, logprob, tuple(map(tuple, top)))


def _logprobs_out(lps: list[TokenLogprob] | None) -> list | None:
    return None if lps is None else [_logprob_out(lp) for lp in lps]


def _logprobs_in(lps: list | None) -> list[TokenLogprob] | None:
    return None if lps is None else [_logprob_in(lp) for lp in lps]
