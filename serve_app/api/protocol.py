"""OpenAI-compatible request bodies (pydantic), plus vLLM's extra sampling fields.

Unknown fields are ignored, as vLLM does, so clients that send newer OpenAI fields still work.
Types and ranges are stated here so /openapi.json describes the bodies truly (fuzzers and
generated clients rely on it); the sampling ranges are the engine's (SAMPLING_BOUNDS).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from serve_app.engine.errors import InvalidRequestError
from serve_app.engine.request import SAMPLING_BOUNDS, SamplingParams

TokenId = Annotated[int, Field(ge=0)]
# torch.Generator.manual_seed takes [-2**63, 2**64)
Seed = Annotated[int, Field(ge=-(2**63), lt=2**64)]
NonEmptyStr = Annotated[str, Field(min_length=1)]


def _b(name: str, default: Any) -> Any:
    return Field(default, **SAMPLING_BOUNDS[name])


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: int = _b("n", 1)
    temperature: float | None = _b("temperature", None)
    top_p: float | None = _b("top_p", None)
    top_k: int | None = _b("top_k", None)
    min_p: float | None = _b("min_p", None)
    seed: Seed | None = None
    stop: NonEmptyStr | list[NonEmptyStr] | None = None
    stop_token_ids: list[TokenId] | None = None
    presence_penalty: float = _b("presence_penalty", 0.0)
    frequency_penalty: float = _b("frequency_penalty", 0.0)
    repetition_penalty: float = _b("repetition_penalty", 1.0)
    min_tokens: int = _b("min_tokens", 0)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            n=self.n,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            stop=self.stop or (),
            stop_token_ids=self.stop_token_ids or (),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: (
        NonEmptyStr
        | Annotated[list[NonEmptyStr], Field(min_length=1)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]
    ) = Field(description="A prompt string, a list of strings, token ids, or lists of token ids.")
    max_tokens: int | None = _b("max_tokens", 16)
    logprobs: int | None = _b("logprobs", None)
    echo: bool = False

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise InvalidRequestError("prompt must not be empty", "prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # one prompt of token ids
        return list(p)

    def to_sampling_params(self) -> SamplingParams:
        if self.echo:
            raise InvalidRequestError("echo is not supported", "echo")
        return self.sampling_params(self.max_tokens, self.logprobs)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise InvalidRequestError(
                    f"content part type {part.get('type')!r} is not supported", "messages"
                )
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = _b("max_tokens", None)
    max_completion_tokens: int | None = _b("max_tokens", None)
    logprobs: bool = False
    top_logprobs: int | None = _b("logprobs", None)
    add_generation_prompt: bool = True

    def to_sampling_params(self) -> SamplingParams:
        if not self.messages:
            raise InvalidRequestError("messages must not be empty", "messages")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs=true", "top_logprobs")
        lp = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.max_completion_tokens or self.max_tokens
        return self.sampling_params(max_tokens, lp)

    def chat_messages(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[TokenId]
