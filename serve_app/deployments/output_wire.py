"""The router -> ingress output channel's wire form: engine outputs as JSON lists, many per frame.

A frame is a 4-byte big-endian length and a JSON array of records, one per request increment:

    [stream, prompt_token_ids | null, finished, num_cached_tokens, choices, error | null,
     prompt_logprobs | null]
    choice = [index, text, token_ids, logprobs | null, finish_reason, stop_reason]
    logprob = [token_id, logprob | null, [[token_id, logprob], ...]]
    prompt_logprobs = [logprob | null, ...]  (the first output only, when asked)
    error = [type name, message, param]

`stream` is the number the ingress gave the request (unique per ingress, unlike request ids,
which clients choose). The prompt's token ids travel once, in a request's first record: the
decoder keeps them. Only JSON: nothing received is unpickled. Pure; no sockets here.
"""

from __future__ import annotations

import json
import struct

from serve_app.engine import errors
from serve_app.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from serve_app.rollout.faults import InjectedFaultError

HEADER = struct.Struct(">I")
RECORD_FIELDS = 7
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


def output_record(stream: int, out: RequestOutput, first: bool) -> list:
    choices = [
        [c.index, c.text, c.token_ids, _logprobs_out(c.logprobs), c.finish_reason, c.stop_reason]
        for c in out.outputs
    ]
    prompt = out.prompt_token_ids if first else None
    prompt_lps = None
    if out.prompt_logprobs is not None:
        prompt_lps = [None if lp is None else _logprob_out(lp) for lp in out.prompt_logprobs]
    return [stream, prompt, out.finished, out.num_cached_tokens, choices, None, prompt_lps]


def _logprob_out(lp: TokenLogprob) -> list:
    return [lp.token_id, lp.logprob, lp.top]


def _logprob_in(lp: list) -> TokenLogprob:
    token_id, logprob, top = lp
    return TokenLogprob(token_id, logprob, tuple(map(tuple, top)))


def _logprobs_out(lps: list[TokenLogprob] | None) -> list | None:
    return None if lps is None else [_logprob_out(lp) for lp in lps]


def _logprobs_in(lps: list | None) -> list[TokenLogprob] | None:
    return None if lps is None else [_logprob_in(lp) for lp in lps]


def error_record(stream: int, error: errors.EngineError) -> list:
    param = getattr(error, "param", None)
    return [stream, None, True, 0, [], [type(error).__name__, str(error), param], None]


def encode_frame(records: list[list]) -> bytes:
    body = json.dumps(records, ensure_ascii=False, separators=(",", ":")).encode()
    return HEADER.pack(len(body)) + body


def decode_frame(body: bytes) -> list[list]:
    try:
        records = json.loads(body)
    except ValueError as e:
        raise WireError(f"frame is not JSON: {e}") from None
    if not isinstance(records, list) or not all(
        isinstance(r, list) and len(r) == RECORD_FIELDS and isinstance(r[0], int) for r in records
    ):
        raise WireError(f"frame is not a list of {RECORD_FIELDS}-field records")
    return records


def decode_record(
    record: list, request_id: str, prompt_token_ids: list[int]
) -> RequestOutput | errors.EngineError:
    """A record as the engine handed it out; prompt_token_ids: what the first record carried."""
    _, prompt, finished, cached, choices, error, prompt_lps = record
    if error is not None:
        name, message, param = error
        cls = _ERRORS.get(name, errors.EngineError)
        return cls(message, param) if cls is errors.InvalidRequestError else cls(message)
    outs = [
        CompletionOutput(index, text, token_ids, _logprobs_in(lps), finish, stop)
        for index, text, token_ids, lps, finish, stop in choices
    ]
    prompt = prompt if prompt is not None else prompt_token_ids
    if prompt_lps is not None:
        prompt_lps = [None if lp is None else _logprob_in(lp) for lp in prompt_lps]
    return RequestOutput(request_id, prompt, outs, finished, cached, prompt_lps)
