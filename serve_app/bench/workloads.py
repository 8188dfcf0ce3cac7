"""Benchmark workloads: seeded, pure generation of (prompt token ids, output length) requests.

Prompts are random token ids drawn from a caller-supplied pool (the vocabulary minus special
tokens), so every system under test (our engine, transformers, vLLM) receives the exact same
ids with no tokenizer in the loop. Generation is a pure function of the spec and the pool:
the same spec always yields the same requests, on any machine.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple


def _check_positive(value: int, name: str) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_range(lo: int, hi: int, name: str) -> None:
    if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
        raise ValueError(f"{name} range must satisfy 1 <= min <= max, got [{lo}, {hi}]")


class BenchRequest(NamedTuple):
    prompt_token_ids: list[int]
    max_tokens: int  # exact: every system is told to ignore EOS


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    requests: list[BenchRequest]
    definition: dict  # the spec that produced it, for the JSON report
    # True: the systems time it from the moment every request has its first token and count
    # only the tokens after it (decode tok/s, prefill excluded); False: end to end
    decode_only: bool = False

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(r.prompt_token_ids) for r in self.requests)

    @property
    def num_output_tokens(self) -> int:
        return sum(r.max_tokens for r in self.requests)


@dataclass(frozen=True, slots=True)
class RandomSpec:
    """Variable lengths in and out: where continuous batching beats static batching."""

    num_prompts: int = 128
    min_input: int = 64
    max_input: int = 512
    min_output: int = 16
    max_output: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        _check_positive(self.num_prompts, "num_prompts")
        _check_range(self.min_input, self.max_input, "input")
        _check_range(self.min_output, self.max_output, "output")

    @property
    def max_seq_len(self) -> int:
        return self.max_input + self.max_output


@dataclass(frozen=True, slots=True)
class FixedSpec:
    """Equal lengths (PEERS.md's workload): the best case for static batching."""

    num_prompts: int = 64
    input_len: int = 128
    output_len: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_prompts", "input_len", "output_len"):
            _check_positive(getattr(self, name), name)

    @property
    def max_seq_len(self) -> int:
        return self.input_len + self.output_len


@dataclass(frozen=True, slots=True)
class PrefixSpec:
    """Groups of prompts sharing a long prefix, each with its own suffix: exercises the
    prefix cache (a system without one recomputes the prefix for every prompt)."""

    num_prefixes: int = 4
    prompts_per_prefix: int = 16
    prefix_len: int = 1024
    suffix_len: int = 64
    output_len: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_prefixes", "prompts_per_prefix", "prefix_len", "suffix_len"):
            _check_positive(getattr(self, name), name)
        _check_positive(self.output_len, "output_len")

    @property
    def num_prompts(self) -> int:
        return self.num_prefixes * self.prompts_per_prefix

    @property
    def max_seq_len(self) -> int:
        return self.prefix_len + self.suffix_len + self.output_len


@dataclass(frozen=True, slots=True)
class DecodeSpec:
    """Exactly batch_size short prompts submitted at once, long outputs: decode speed at one
    batch size, where every step streams the active weights (timed from the first tokens)."""

    batch_size: int = 1
    min_input: int = 16
    max_input: int = 32
    output_len: int = 256
    seed: int = 4

    def __post_init__(self) -> None:
        _check_positive(self.batch_size, "batch_size")
        _check_range(self.min_input, self.max_input, "input")
        # NOTE: at least 2: the first token is prefill's, the decode rate counts the rest
        if not isinstance(self.output_len, int) or self.output_len < 2:
            raise ValueError(f"output_len must be an integer >= 2, got {self.output_len!r}")

    @property
    def num_prompts(self) -> int:
        return self.batch_size

    @property
    def max_seq_len(self) -> int:
        return self.max_input + self.output_len


WorkloadSpec = RandomSpec | FixedSpec | PrefixSpec | DecodeSpec

DECODE_BATCHES = (1, 8, 64)

# Distinct seeds: workloads that shared a seed would share leading token ids, and the engines'
# prefix caches would then carry hits from one workload into the next.
DEFAULT_SPECS: dict[str, WorkloadSpec] = {
    "random": RandomSpec(seed=1),
    "fixed": FixedSpec(seed=2),
    "prefix": PrefixSpec(seed=3),
}


def decode_specs(
    batches: Sequence[int] = DECODE_BATCHES, output_len: int = 256, seed: int = 4
) -> dict[str, DecodeSpec]:
    """The `decode` workload: one row per batch size (`decode-b1`, `decode-b8`, ...). Each
    batch gets its own seed, so no batch's prompts are a prefix cache hit for another's."""
    if not batches:
        raise ValueError("decode needs at least one batch size")
    return {
        f"decode-b{b}": DecodeSpec(batch_size=b, output_len=output_len, seed=seed * 1000 + b)
        for b in batches
    }


def resolve_specs(
    names: Sequence[str],
    num_prompts: int | None = None,
    decode_batches: Sequence[int] = DECODE_BATCHES,
    decode_output_len: int = 256,
) -> list[tuple[str, WorkloadSpec]]:
    """--workloads names to (row name, spec): `decode` expands to one row per batch size;
    num_prompts resizes the others (a decode row's prompt count is its batch size)."""
    out: list[tuple[str, WorkloadSpec]] = []
    for name in names:
        if name == "decode":
            out.extend(decode_specs(decode_batches, decode_output_len).items())
        elif name in DEFAULT_SPECS:
            spec = DEFAULT_SPECS[name]
            out.append((name, spec if num_prompts is None else with_num_prompts(spec, num_prompts)))
        else:
            raise ValueError(f"unknown workload {name!r}; workloads: {[*DEFAULT_SPECS, 'decode']}")
    return out


def with_num_prompts(spec: WorkloadSpec, num_prompts: int) -> WorkloadSpec:
    """The spec resized to about num_prompts prompts (prefix: spread over its groups)."""
    _check_positive(num_prompts, "num_prompts")
    if isinstance(spec, PrefixSpec):
        return replace(spec, prompts_per_prefix=max(1, num_prompts // spec.num_prefixes))
    return replace(spec, num_prompts=num_prompts)


def fit_to_model_len(spec: WorkloadSpec, max_model_len: int) -> WorkloadSpec:
    """Shrink the longest inputs so prompt + output fits max_model_len; raises if impossible."""
    excess = spec.max_seq_len - max_model_len
    if excess <= 0:
        return spec
    if isinstance(spec, PrefixSpec) and spec.prefix_len > excess:
        return replace(spec, prefix_len=spec.prefix_len - excess)
    if isinstance(spec, RandomSpec) and spec.max_input - excess >= spec.min_input:
        return replace(spec, max_input=spec.max_input - excess)
    if isinstance(spec, FixedSpec) and spec.input_len > excess:
        return replace(spec, input_len=spec.input_len - excess)
    if isinstance(spec, DecodeSpec) and spec.output_len - excess >= 2:
        return replace(spec, output_len=spec.output_len - excess)
    raise ValueError(f"{spec} does not fit max_model_len {max_model_len}")


def token_pool(vocab_size: int, special_ids: Sequence[int]) -> list[int]:
    """Token ids a prompt may use: the vocabulary minus special tokens (EOS, chat markers)."""
    special = set(special_ids)
    pool = [t for t in range(vocab_size) if t not in special]
    if not pool:
        raise ValueError("no non-special tokens in the vocabulary")
    return pool


def build_workload(name: str, spec: WorkloadSpec, pool: Sequence[int]) -> Workload:
    """Generate the requests of `spec`; a pure function of (spec, pool)."""
    if not pool:
        raise ValueError("token pool must not be empty")
    # A private Random: never touches the global RNG, so callers stay reproducible too.
    rng = random.Random(spec.seed)
    if isinstance(spec, RandomSpec):
        reqs = [
            BenchRequest(
                _ids(rng, pool, rng.randint(spec.min_input, spec.max_input)),
                rng.randint(spec.min_output, spec.max_output),
            )
            for _ in range(spec.num_prompts)
        ]
    elif isinstance(spec, FixedSpec):
        reqs = [
            BenchRequest(_ids(rng, pool, spec.input_len), spec.output_len)
            for _ in range(spec.num_prompts)
        ]
    elif isinstance(spec, PrefixSpec):
        reqs = []
        for _ in range(spec.num_prefixes):
            prefix = _ids(rng, pool, spec.prefix_len)
            for _ in range(spec.prompts_per_prefix):
                reqs.append(
                    BenchRequest(prefix + _ids(rng, pool, spec.suffix_len), spec.output_len)
                )
    elif isinstance(spec, DecodeSpec):
        reqs = [
            BenchRequest(
                _ids(rng, pool, rng.randint(spec.min_input, spec.max_input)), spec.output_len
            )
            for _ in range(spec.batch_size)
        ]
    else:
        raise TypeError(f"unknown workload spec {type(spec).__name__}")
    definition = {"kind": type(spec).__name__, **asdict(spec), "num_prompts": len(reqs)}
    return Workload(name, reqs, definition, decode_only=isinstance(spec, DecodeSpec))


def _ids(rng: random.Random, pool: Sequence[int], n: int) -> list[int]:
    return [pool[rng.randrange(len(pool))] for _ in range(n)]
