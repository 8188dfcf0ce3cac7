"""OpenAI-compatible request bodies (pydantic), plus vLLM's extra sampling fields.

A field that the server does not know is a 400 naming it, as OpenAI answers (`unknown_fields`;
`api.unknown_fields: ignore` makes the server ignore them instead, as vLLM does); an OpenAI field
that it knows and cannot honour is a 400 with its own reason (`_UNSUPPORTED`). Never silently
dropped. docs/structured-outputs.md lists what is accepted and ignored on purpose.
Types and ranges are stated here so /openapi.json describes the bodies truly (fuzzers and
generated clients rely on it); the sampling ranges are the engine's (SAMPLING_BOUNDS).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from serve_app.api.checked import CheckedModel
from serve_app.api.constraints import (
    STRUCTURED_KEYS,
    ResponseFormat,
    StructuredOutputs,
    one_constraint,
)
from serve_app.api.schemas import enforced
from serve_app.api.tools import tool_call_grammar
from serve_app.engine.errors import InvalidRequestError
from serve_app.engine.request import SAMPLING_BOUNDS, GrammarSpec, SamplingParams

TokenId = Annotated[int, Field(ge=0)]
# torch.Generator.manual_seed takes [-2**63, 2**64)
Seed = Annotated[int, Field(ge=-(2**63), lt=2**64)]
NonEmptyStr = Annotated[str, Field(min_length=1)]


def _b(name: str, default: Any) -> Any:
    return Field(default, **SAMPLING_BOUNDS[name])


# What the server does with a request field it does not know (create_app, api.unknown_fields).
UnknownFields = Literal["reject", "ignore"]

# OpenAI fields that would change the output and that this server cannot honour.
_UNSUPPORTED = {
    "suffix": "suffix (insertion) is not supported",
    "functions": "functions is deprecated and not supported; use tools",
    "function_call": "function_call is deprecated and not supported; use tool_choice",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
}
# apply_chat_template's own arguments and what the server passes it: not chat_template_kwargs'
_TEMPLATE_ARGS = frozenset(
    {"conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt"}
    | {"continue_final_message", "tokenize", "padding", "truncation", "max_length"}
    | {"return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"}
)
_TOOL_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


class StreamOptions(CheckedModel):
    include_usage: bool = False
    # vLLM's: every chunk carries the usage so far (with include_usage)
    continuous_usage_stats: bool = False
    # OpenAI's: each chunk carries a random-length `obfuscation` string, so that payload sizes
    # do not reveal token lengths to an observer of encrypted traffic. Off unless asked (OpenAI
    # turns it on by default; vLLM does not have it).
    include_obfuscation: bool = False


class _SamplingFields(CheckedModel):
    # the fields it does not declare, in model_extra: the _UNSUPPORTED ones and the unknown
    # ones (unknown_keys), each a 400

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
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # Accepted and ignored on purpose (no effect on the output): see the docs.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None  # OpenAI's caching hint; prefix caching is automatic
    safety_identifier: str | None = None

    def unknown_keys(self, path: str = "") -> list[str]:
        """The body's fields that this server neither implements nor ignores on purpose, and
        the unknown keys inside its objects (`messages[0].foo`, `stream_options.bar`); the
        _UNSUPPORTED fields have their own 400 (_check_supported)."""
        return [n for n in super().unknown_keys(path) if n not in _UNSUPPORTED]

    def _check_supported(self) -> None:
        extra = self.model_extra or {}
        for name, why in _UNSUPPORTED.items():
            if extra.get(name) is not None:
                raise InvalidRequestError(why, name)
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError(  # as OpenAI and vLLM answer
                "stream_options is only allowed when stream is true", "stream_options"
            )

    def _grammar(self) -> GrammarSpec | None:
        guided = {k: getattr(self, f"guided_{k}") for k in STRUCTURED_KEYS}
        return one_constraint(self.response_format, self.structured_outputs, guided)

    def _logit_bias(self) -> dict[int, float]:
        out = {}
        for k, v in (self.logit_bias or {}).items():
            try:
                out[int(k)] = float(v)
            except ValueError as e:
                raise InvalidRequestError(
                    f"logit_bias keys must be token ids, got {k!r}", "logit_bias"
                ) from e
        return out

    def sampling_params(
        self,
        max_tokens: int | None,
        logprobs: int | None,
        grammar: GrammarSpec | None = None,
        prompt_logprobs: int | None = None,
    ) -> SamplingParams:
        self._check_supported()
        if grammar is None:
            grammar = self._grammar()
        elif self._grammar() is not None:
            raise InvalidRequestError(
                "tool_choice required/named cannot be combined with response_format", "tool_choice"
            )
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
            logit_bias=self._logit_bias(),
            structured=grammar,
            prompt_logprobs=prompt_logprobs,
        )

    @property
    def stream_opts(self) -> StreamOptions:
        return self.stream_options or StreamOptions()


class CompletionRequest(_SamplingFields):
    prompt: (
        NonEmptyStr
        | Annotated[list[NonEmptyStr], Field(min_length=1)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]
    ) = Field(description="A prompt string, a list of strings, token ids, or lists of token ids.")
    max_tokens: int | None = Field(
        16,
        ge=0,
        description="Tokens to generate; 0 with echo scores the prompt alone (OpenAI's legacy "
        "scoring, lm-eval-harness' loglikelihood).",
    )
    max_completion_tokens: int | None = _b("max_tokens", None)
    logprobs: int | None = _b("logprobs", None)
    echo: bool = False
    prompt_logprobs: int | None = None
    best_of: int | None = None

    @property
    def prompt_only(self) -> bool:
        """echo with max_tokens 0: the prompt (and its logprobs) with no completion tokens."""
        return self.echo and self.max_tokens == 0 and self.max_completion_tokens is None

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
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequestError("best_of other than n is not supported", "best_of")
        max_tokens = self.max_completion_tokens or self.max_tokens
        if self.prompt_only:
            max_tokens = 1  # the engine samples one token; the response leaves it out
        elif max_tokens == 0:
            raise InvalidRequestError(
                "max_tokens 0 needs echo: true (it scores the prompt alone)", "max_tokens"
            )
        # echo with logprobs needs the prompt's logprobs (lm-eval-harness' loglikelihood).
        prompt_lp = self.prompt_logprobs
        if self.echo and self.logprobs is not None and prompt_lp is None:
            prompt_lp = self.logprobs
        return self.sampling_params(max_tokens, self.logprobs, prompt_logprobs=prompt_lp)


class FunctionCall(CheckedModel):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(CheckedModel):
    # index: a streamed delta's (merged deltas dumped back into a message carry it); no meaning
    # in a request
    index: int | None = None
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDef(CheckedModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(CheckedModel):
    type: Literal["function"] = "function"
    function: FunctionDef


class ToolName(CheckedModel):
    name: str


class NamedToolChoice(CheckedModel):
    type: Literal["function"] = "function"
    function: ToolName


_TEXT_PART_KEYS = frozenset({"type", "text"})
# Keys of a message that OpenAI and vLLM put in their responses (so a client that sends an
# answer back as history has them) and that this server cannot honour when set.
_UNSUPPORTED_IN_MESSAGE = {
    "audio": "audio in messages is not supported",
    "function_call": "function_call is deprecated and not supported; use tool_calls",
}


class ChatMessage(CheckedModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    # An assistant's refusal (OpenAI's responses carry it, usually null): the message's text
    # when it has no content.
    refusal: str | None = None
    # vLLM's / DeepSeek's reasoning of an earlier answer: passed to the chat template as given
    # (Qwen3's uses reasoning_content; the project's ChatML template ignores both).
    reasoning_content: str | None = None
    reasoning: str | None = None
    # Accepted and ignored on purpose: response metadata (url citations) with no place in a
    # prompt. See the docs.
    annotations: list[dict[str, Any]] | None = None
    audio: dict[str, Any] | None = None  # a 400 unless null (_UNSUPPORTED_IN_MESSAGE)
    function_call: dict[str, Any] | None = None  # the same

    def unknown_keys(self, path: str) -> list[str]:
        names = super().unknown_keys(path)
        if isinstance(self.content, list):
            for i, part in enumerate(self.content):
                if part.get("type") == "text":
                    names += [f"{path}.content[{i}].{k}" for k in part if k not in _TEXT_PART_KEYS]
        return names

    def template_dict(self, path: str = "messages") -> dict[str, Any]:
        """The message as chat templates expect it (Qwen's: tool_calls[].function)."""
        for key, why in _UNSUPPORTED_IN_MESSAGE.items():
            if getattr(self, key) is not None:
                raise InvalidRequestError(why, f"{path}.{key}")
        msg: dict[str, Any] = {"role": self.role, "content": self.text(path)}
        if self.tool_calls:
            msg["tool_calls"] = [
                {"id": c.id, "type": "function", "function": c.function.declared_dump()}
                for c in self.tool_calls
            ]
        for key in ("tool_call_id", "name", "reasoning_content", "reasoning"):
            if (value := getattr(self, key)) is not None:
                msg[key] = value
        return msg

    def text(self, path: str = "messages") -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or self.refusal or ""
        parts = []
        for i, part in enumerate(self.content):
            if part.get("type") != "text":
                raise InvalidRequestError(
                    f"content part type {part.get('type')!r} is not supported",
                    f"{path}.content[{i}]",
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
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] | None = Field(
        None,
        description="Extra variables for the chat template (vLLM's field), e.g. "
        '{"enable_thinking": false}; a template ignores the ones it does not use.',
    )
    # Accepted and ignored on purpose: see the docs.
    modalities: list[Literal["text"]] | None = None
    reasoning_effort: str | None = None

    def to_sampling_params(self) -> SamplingParams:
        if not self.messages:
            raise InvalidRequestError("messages must not be empty", "messages")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs=true", "top_logprobs")
        lp = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.max_completion_tokens or self.max_tokens
        return self.sampling_params(max_tokens, lp, grammar=self._tool_grammar())

    @property
    def effective_tool_choice(self) -> str:
        """none | auto | required | named; OpenAI's default is auto with tools, else none."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or ("auto" if self.tools else "none")

    @property
    def parses_tool_calls(self) -> bool:
        return bool(self.tools) and self.effective_tool_choice != "none"

    @property
    def tool_calls_finish_reason(self) -> str:
        """A choice that called tools ends with `tool_calls` under auto / required and with
        `stop` under a named tool_choice (OpenAI's API; vLLM's serving_chat does the same)."""
        return "stop" if self.effective_tool_choice == "named" else "tool_calls"

    def _tool_grammar(self) -> GrammarSpec | None:
        """The grammar of tool_choice required / named. Every tool is checked first, whatever
        tool_choice says: a bad name or parameters schema is a 400 naming its path."""
        schemas = {}
        for i, tool in enumerate(self.tools or ()):
            f = tool.function
            if not f.name or len(f.name) > 64 or not set(f.name) <= _TOOL_NAME_CHARS:
                raise InvalidRequestError(
                    f"tools[{i}].function.name: {f.name!r} must match ^[a-zA-Z0-9_-]{{1,64}}$",
                    f"tools[{i}].function.name",
                )
            params = f.parameters if f.parameters is not None else {"type": "object"}
            schemas[f.name] = enforced(params, f"tools[{i}].function.parameters", f.strict)
        choice = self.effective_tool_choice
        if choice in ("none", "auto"):
            return None
        if not schemas:
            raise InvalidRequestError(f"tool_choice {choice!r} requires tools", "tool_choice")
        if choice == "named":
            name = self.tool_choice.function.name
            if name not in schemas:
                raise InvalidRequestError(f"tool_choice names unknown tool {name!r}", "tool_choice")
            return tool_call_grammar([(name, schemas[name])], parallel=False)
        return tool_call_grammar(list(schemas.items()), self.parallel_tool_calls)

    def template_kwargs(self) -> dict[str, Any]:
        """chat_template_kwargs, checked: the template's own arguments are set by the server."""
        kwargs = self.chat_template_kwargs or {}
        if taken := sorted(_TEMPLATE_ARGS & kwargs.keys()):
            raise InvalidRequestError(
                f"chat_template_kwargs may not set {', '.join(taken)}", "chat_template_kwargs"
            )
        return kwargs

    def chat_messages(self) -> list[dict[str, Any]]:
        return [m.template_dict(f"messages[{i}]") for i, m in enumerate(self.messages)]

    def template_tools(self) -> list[dict[str, Any]] | None:
        """Tools as chat templates take them; none when tool_choice is none (as vLLM)."""
        if not self.tools or self.effective_tool_choice == "none":
            return None
        return [t.declared_dump(exclude_none=True) for t in self.tools]
