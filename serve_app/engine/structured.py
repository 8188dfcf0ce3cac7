"""Structured outputs: grammar matchers that constrain sampling, on llguidance.

Shape legend: B rows in the batch, G rows of them with a grammar, V vocabulary entries,
W = ceil(V / 32) int32 words of a token bitmask.

How it fits (after vLLM v1's `structured_output/`):
- GrammarCompiler turns a GrammarSpec into a matcher on a small thread pool, never on the
  step loop, and caches one pristine matcher per (kind, value); each sequence gets its own
  cheap deep copy (n > 1 = one matcher per sequence).
- Each step, `apply_grammar_bitmask` fills one [G, W] bitmask for the G rows that have a
  grammar and masks their logits; a batch with no grammar row does none of it.
- The engine advances a matcher with every accepted token, so a matcher has always accepted
  exactly the request's output tokens: preemption (recompute keeps the output tokens) and
  abort (the matcher is dropped with the request) need no extra bookkeeping.
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from serve_app.engine.errors import InvalidRequestError, grammar_error_line
from serve_app.engine.request import JSON_OPTIONS, GrammarSpec, Request

log = logging.getLogger(__name__)

COMPILE_TIMEOUT_S = 30.0
_CACHE_SIZE = 256


def grammar_text(spec: GrammarSpec) -> str:
    """The llguidance grammar for a spec; raises InvalidRequestError for malformed input."""
    import llguidance as llg

    try:
        if spec.kind == "json":
            schema = json.loads(spec.value)
            if not isinstance(schema, dict):
                raise ValueError("a JSON schema must be an object")
            return llg.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
        if spec.kind == "regex":
            return llg.LLMatcher.grammar_from_regex(spec.value)
        if spec.kind == "choice":
            choices = json.loads(spec.value)
            if not choices or not all(isinstance(c, str) for c in choices):
                raise ValueError("choice must be a non-empty list of strings")
            return llg.grammar_from("choice", spec.value)
        return llg.grammar_from("grammar", spec.value)  # Lark, or GBNF converted to Lark
    except ValueError as e:
        raise InvalidRequestError(
            f"invalid {spec.kind} constraint: {grammar_error_line(str(e))}", spec.param
        ) from e


class GrammarMatcher:
    """One sequence's matcher: the tokens it allows next, and the tokens it accepted."""

    __slots__ = ("_m", "num_accepted")

    def __init__(self, matcher) -> None:
        self._m = matcher
        self.num_accepted = 0

    def fill_bitmask(self, row: torch.Tensor) -> None:
        """row: one contiguous [W] int32 CPU tensor; bit t set = token t allowed."""
        self._m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    def accept(self, token_id: int) -> bool:
        ok = self._m.consume_token(token_id)
        if ok:
            self.num_accepted += 1
        return ok

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and allows no further token."""
        return self._m.is_stopped()

    @property
    def error(self) -> str:
        return self._m.get_error()


class GrammarCompiler:
    """Compiles GrammarSpecs for one tokenizer on a thread pool, with a bounded cache."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: frozenset[int], workers: int = 2):
        self._hf_tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="grammar")
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], Future] = {}
        self._ll_tokenizer = None
        self.num_compiled = 0  # cache misses, for tests and stats

    def _tokenizer(self):
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance.hf

                self._ll_tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self._vocab_size, eos_token=self._eos
                )
            return self._ll_tokenizer

    def submit(self, spec: GrammarSpec) -> Future:
        """A future of the pristine matcher for `spec` (compiled once, then cached)."""
        with self._lock:
            fut = self._cache.get(spec.key)
            if fut is not None:
                return fut
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.pop(next(iter(self._cache)))  # oldest first
            fut = self._cache[spec.key] = self._pool.submit(self._compile, spec)
            self.num_compiled += 1
            return fut

    def _compile(self, spec: GrammarSpec):
        import llguidance as llg

        text = grammar_text(spec)
        matcher = llg.LLMatcher(self._tokenizer(), text, log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(
                f"invalid {spec.kind} constraint: {grammar_error_line(matcher.get_error())}",
                spec.param,
            )
        return matcher

    def matcher(self, spec: GrammarSpec) -> GrammarMatcher:
        """A fresh matcher for one sequence; waits for the compile (not on the step loop)."""
        fut = self.submit(spec)
        try:
            pristine = fut.result(timeout=COMPILE_TIMEOUT_S)
        except InvalidRequestError:
            with self._lock:  # a bad spec is not worth a cache slot
                if self._cache.get(spec.key) is fut:
                    del self._cache[spec.key]
            raise
        return GrammarMatcher(pristine.deep_copy())

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def apply_grammar_bitmask(logits: torch.Tensor, requests: list[Request]) -> None:
    """In place on logits [B, V]: -inf for every token the row's grammar forbids next."""
    rows = [i for i, r in enumerate(requests) if r.grammar is not None]
    if not rows:
        return
    vocab = logits.shape[1]
    words = (vocab + 31) // 32
    bitmask = torch.empty(len(rows), words, dtype=torch.int32)  # [G, W], CPU
    for g, i in enumerate(rows):
        requests[i].grammar.fill_bitmask(bitmask[g])
    shifts = torch.arange(32, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).view(len(rows), words * 32)[:, :vocab]
    allowed = allowed.to(device=logits.device, dtype=torch.bool)
    idx = torch.tensor(rows, device=logits.device)
    logits[idx] = logits[idx].masked_fill(~allowed, -torch.inf)


def apply_logit_bias(logits: torch.Tensor, requests: list[Request]) -> None:
    """In place on logits [B, V]: OpenAI's logit_bias, added to the listed token ids."""
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    for i, r in enumerate(requests):
        for token, bias in r.sampling_params.logit_bias:
            rows.append(i)
            cols.append(token)
            vals.append(bias)
    if rows:
        dev = logits.device
        idx = (torch.tensor(rows, device=dev), torch.tensor(cols, device=dev))
        logits.index_put_(idx, torch.tensor(vals, device=dev, dtype=logits.dtype), accumulate=True)
