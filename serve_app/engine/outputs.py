"""What the engine takes and hands back: small typed results, never its internals.

The engine core is token-in/token-out: it takes EngineRequests (prompt token ids, n == 1) and
emits EngineOutputs (new token ids, their logprobs, the finish). Text (tokenizing, detokenizing,
stop strings, n > 1) is the front end's (serve_app/frontend/), which turns them into
RequestOutputs: the CompletionOutput deltas the API renders.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from serve_app.engine.request import SamplingParams


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """Logprob of one generated token, plus the top-k alternatives (token id, logprob)."""

    token_id: int
    logprob: float | None  # None only for a prompt's first token, echoed (it has no context)
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class SamplerOutput:
    """One sampled token per scheduled-to-sample request, in batch order."""

    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


@dataclass(frozen=True, slots=True)
class LoraRef:
    """The LoRA adapter a request runs: its name, the PEFT directory it loads from ("": one
    the engine already holds, e.g. from its config) and the name's revision (each load
    through the API bumps it, so an engine holding an older revision reloads it). A pinned
    adapter is never evicted from an engine that makes it resident (docs/lora.md, "Memory")."""

    name: str
    path: str = ""
    revision: int = 0
    pinned: bool = False


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """One sequence for the engine core: its prompt as token ids, its sampling (params.n == 1;
    the front end fans n > 1 out into n of these), its grammar in params.structured."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    lora: LoraRef | None = None  # None: the base model


@dataclass(slots=True)
class EngineOutput:
    """What one engine step (or several, coalesced) made of one sequence (vLLM v1's
    EngineCoreOutput): token ids and logprob ids, no text."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | None = None  # the stop token id that matched (eos: None)
    # The last new token is the eos / stop token that ended the sequence: its text is not
    # output (unless include_stop_str_in_output). A grammar that completed sets no such flag.
    stop_token: bool = False
    num_cached_tokens: int = 0
    # In a sequence's first output only, when asked: None, then one per prompt token after it.
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass(slots=True)
class CompletionOutput:
    """A delta (streaming) or the whole text (final) of one of the n choices of a request."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop string or stop token id that matched


@dataclass(slots=True)
class RequestOutput:
    """One increment of a request's output. `outputs` holds only the choices that advanced."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    # In a request's first output only, when asked: None for the first prompt token (it has
    # no context), then one entry per prompt token (vLLM's prompt_logprobs).
    prompt_logprobs: list[TokenLogprob | None] | None = None


def coalesce(outputs: list[RequestOutput]) -> RequestOutput:
    """Several consecutive increments of one request as one: each choice's deltas joined in
    order (text, token ids, logprobs), its finish from the last one that has it. What a
    consumer that fell behind receives instead of a backlog of one-token items."""
    if len(outputs) == 1:
        return outputs[0]
    merged: dict[int, CompletionOutput] = {}
    for out in outputs:
        for c in out.outputs:
            m = merged.get(c.index)
            if m is None:
                merged[c.index] = CompletionOutput(
                    c.index,
                    c.text,
                    list(c.token_ids),
                    None if c.logprobs is None else list(c.logprobs),
                    c.finish_reason,
                    c.stop_reason,
                )
                continue
            m.text += c.text
            m.token_ids.extend(c.token_ids)
            if c.logprobs is not None:
                m.logprobs = (m.logprobs or []) + list(c.logprobs)
            if c.finish_reason is not None:
                m.finish_reason, m.stop_reason = c.finish_reason, c.stop_reason
    first, last = outputs[0], outputs[-1]
    return RequestOutput(
        first.request_id,
        first.prompt_token_ids,
        [merged[i] for i in sorted(merged)],
        last.finished,
        first.num_cached_tokens,
        first.prompt_logprobs,
    )
