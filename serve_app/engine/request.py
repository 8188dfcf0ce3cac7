"""Request state and sampling parameters. Plain Python, no torch: the scheduler stays torch-free."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from serve_app.engine.errors import InvalidRequestError

GrammarKind = Literal["json", "regex", "choice", "grammar"]


# llguidance's JSON options for every JSON grammar (engine/structured.py, api/tools.py).
# Compact JSON ("a":1,"b":2): free whitespace lets an unsure model pad until max_tokens.
JSON_OPTIONS = {"whitespace_flexible": False}


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    """A constraint on the output, enforced token by token (see engine/structured.py).

    kind "json": value is a JSON schema as canonical JSON text ("{}" = any JSON object);
    "regex": a regular expression; "choice": a JSON list of strings; "grammar": Lark (or GBNF)
    text. `param` names the request field it came from, for 400 errors; the compile cache is
    keyed by (kind, value) only.
    """

    kind: GrammarKind
    value: str
    param: str = field(default="structured_outputs", compare=False)

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.value


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request sampling settings, following vLLM's semantics.

    temperature 0 means greedy. top_k <= 0 and top_p == 1 disable those filters.
    presence/frequency penalties apply to generated tokens; repetition_penalty to prompt + output.
    """

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # Added to the logits of these token ids before sampling (OpenAI's logit_bias).
    logit_bias: tuple[tuple[int, float], ...] = ()
    structured: GrammarSpec | None = None
    # Logprobs of every prompt token after the first (with this many top alternatives).
    prompt_logprobs: int | None = None

    MAX_LOGPROBS = 20

    def __post_init__(self) -> None:
        # Accept lists from JSON and normalise to tuples so the object stays hashable.
        object.__setattr__(self, "stop", _as_tuple(self.stop, str, "stop"))
        object.__setattr__(
            self, "stop_token_ids", _as_tuple(self.stop_token_ids, int, "stop_token_ids")
        )
        if isinstance(self.logit_bias, dict):
            object.__setattr__(self, "logit_bias", tuple(self.logit_bias.items()))
        self._validate()

    def _validate(self) -> None:
        def bad(param: str, why: str) -> InvalidRequestError:
            return InvalidRequestError(f"{param} {why}", param=param)

        if not isinstance(self.n, int) or self.n < 1 or self.n > 128:
            raise bad("n", f"must be an integer in [1, 128], got {self.n!r}")
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or self.max_tokens < 1
        ):
            raise bad("max_tokens", f"must be a positive integer, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", f"must be a non-negative integer, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"({self.min_tokens}) must not exceed max_tokens")
        if not 0.0 <= self.temperature <= 100.0:
            raise bad("temperature", f"must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad("top_k", f"must be -1, 0 (disabled) or a positive integer, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise bad("repetition_penalty", f"must be in (0, 2], got {self.repetition_penalty}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", f"must be an integer, got {self.seed!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= self.MAX_LOGPROBS:
            raise bad("logprobs", f"must be in [0, {self.MAX_LOGPROBS}], got {self.logprobs}")
        if any(s == "" for s in self.stop):
            raise bad("stop", "must not contain empty strings")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= self.MAX_LOGPROBS:
            raise bad(
                "prompt_logprobs",
                f"must be in [0, {self.MAX_LOGPROBS}], got {self.prompt_logprobs}",
            )
        for token, bias in self.logit_bias:
            if not isinstance(token, int) or isinstance(token, bool) or token < 0:
                raise bad("logit_bias", f"keys must be token ids, got {token!r}")
            if not -100.0 <= bias <= 100.0:
                raise bad("logit_bias", f"values must be in [-100, 100], got {bias}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# The ranges SamplingParams accepts, as pydantic Field keywords, so the HTTP API's schema
# (serve_app/api/protocol.py, /openapi.json) states them; tests/engine/test_sampling_bounds.py
# checks both agree at every edge.
SAMPLING_BOUNDS: dict[str, dict[str, float]] = {
    "n": {"ge": 1, "le": 128},
    "max_tokens": {"ge": 1},
    "min_tokens": {"ge": 0},
    "temperature": {"ge": 0.0, "le": 100.0},
    "top_p": {"gt": 0.0, "le": 1.0},
    "top_k": {"ge": -1},
    "min_p": {"ge": 0.0, "le": 1.0},
    "presence_penalty": {"ge": -2.0, "le": 2.0},
    "frequency_penalty": {"ge": -2.0, "le": 2.0},
    "repetition_penalty": {"gt": 0.0, "le": 2.0},
    "logprobs": {"ge": 0, "le": SamplingParams.MAX_LOGPROBS},
}


def _as_tuple(value: Any, kind: type, param: str) -> tuple:
    if value is None:
        return ()
    if isinstance(value, kind):
        value = (value,)
    try:
        items = tuple(value)
    except TypeError as e:
        raise InvalidRequestError(f"{param} must be a list of {kind.__name__}", param) from e
    if not all(isinstance(x, kind) and not isinstance(x, bool) for x in items):
        raise InvalidRequestError(f"{param} must be a list of {kind.__name__}", param)
    return items


class RequestStatus(enum.IntEnum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    # Everything after this point is finished.
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass(slots=True, eq=False)
class Request:
    """One sequence being generated. A request with n > 1 is fanned out into n of these.

    num_computed_tokens counts tokens whose K/V are in the cache; all_token_ids = prompt + output.
    block_hashes holds the chained hash of every *full* block of all_token_ids.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    max_tokens: int = 16  # resolved against the context length by the engine
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit length at first schedule; -1 = not yet
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    block_hashes: list[bytes] = field(default_factory=list)
    stop_reason: int | str | None = None
    # The grammar matcher (engine/structured.py) when the output is constrained; it has
    # accepted exactly output_token_ids, also across preemption and recompute.
    grammar: Any = None
    # Logprobs of prompt tokens 1.. (TokenLogprob), filled while the prompt is computed.
    prompt_logprobs: list = field(default_factory=list)
    # The LoRA adapter it runs (serve_app/lora/peft_format.LoraAdapter), None: the base model;
    # with one, its block hashes chain from hash_root (engine/block_hash.adapter_root).
    lora: Any = None
    hash_root: bytes | None = None

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished


def resolve_max_tokens(num_prompt: int, max_tokens: int | None, max_model_len: int) -> int:
    """The completion budget of a prompt of num_prompt tokens (None: all the room left), or an
    InvalidRequestError when it does not fit max_model_len. Shared by the engine and the API,
    which checks every prompt of a request before it submits any."""
    if num_prompt >= max_model_len:
        raise InvalidRequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"prompt has {num_prompt} tokens, which leaves no room for output.",
            "prompt",
        )
    if max_tokens is None:
        return max_model_len - num_prompt
    if num_prompt + max_tokens > max_model_len:
        raise InvalidRequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {num_prompt + max_tokens} tokens ({num_prompt} in the prompt, "
            f"{max_tokens} in the completion). Reduce the length.",
            "max_tokens",
        )
    return max_tokens
