"""What the engine hands back: small typed results, never its internals."""

from __future__ import annotations

from dataclasses import dataclass, field


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
