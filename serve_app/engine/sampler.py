"""Turns one row of logits per request into one token id, following vLLM v1's sampler.

Shape legend: B rows in the batch (one per request), V vocabulary entries, and subsets of B:
R random (temperature > 0) rows, P rows with penalties, L rows that want logprobs.

Order of operations (vLLM v1):
  [logit_bias, grammar bitmask: only in steps with such a row]
  -> raw logprobs -> min_tokens mask -> penalties -> greedy argmax
  random rows: / temperature -> min_p -> top_k -> top_p -> exponential-race sample
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from serve_app.engine.outputs import SamplerOutput, TokenLogprob
from serve_app.engine.request import Request, SamplingParams
from serve_app.engine.structured import apply_grammar_bitmask, apply_logit_bias

# vLLM clamps tiny positive temperatures: logits / 1e-6 overflows float32 into inf and NaN probs.
_MIN_TEMPERATURE = 1e-2


@dataclass(slots=True)
class _RowState:
    """What the sampler keeps for one request across steps (and across preemption)."""

    generator: torch.Generator | None = None
    # [V] bool: which tokens occur in the prompt; built once, only for repetition_penalty.
    prompt_mask: torch.Tensor | None = None


class RowStates:
    """Per-request sampler state by request id, kept here so Request stays torch-free.
    NOTE: release() must see every finished request (the scheduler's on_finish), or the seeded
    generators of finished requests pile up."""

    __slots__ = ("_by_id",)

    def __init__(self) -> None:
        self._by_id: dict[str, _RowState] = {}

    def of(self, r: Request) -> _RowState:
        state = self._by_id.get(r.request_id)
        if state is None:
            state = self._by_id[r.request_id] = _RowState()
        return state

    def release(self, requests: list[Request]) -> None:
        for r in requests:
            self._by_id.pop(r.request_id, None)

    def __len__(self) -> int:
        return len(self._by_id)


def _has_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def _min_tokens_active(r: Request) -> bool:
    return r.num_output_tokens < r.sampling_params.min_tokens


def _is_plain_greedy(r: Request) -> bool:
    p = r.sampling_params
    return (
        p.temperature == 0.0
        and p.logprobs is None
        and not _has_penalties(p)
        and not _min_tokens_active(r)
    )


class Sampler:
    """Samples one token per row. Stateless apart from per-request state (seeded generators,
    prompt masks) in `states`, released when the scheduler finishes a request."""

    def __init__(self) -> None:
        self.states = RowStates()

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(requests):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(requests)} requests")
        if not requests:
            return SamplerOutput(token_ids=[], logprobs=[])
        if any(r.grammar is not None or r.sampling_params.logit_bias for r in requests):
            # Logits processors, before everything else (as vLLM applies the grammar bitmask
            # before its sampler); only in steps with such a row.
            logits = logits.to(torch.float32, copy=True)
            apply_logit_bias(logits, requests)
            apply_grammar_bitmask(logits, requests)
        # Hot path: argmax is exact in the input dtype (upcasting to float32 preserves order).
        if all(_is_plain_greedy(r) for r in requests):
            return SamplerOutput(
                token_ids=logits.argmax(dim=-1).tolist(), logprobs=[None] * len(requests)
            )
        return self._sample_general(logits, requests)

    def _sample_general(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        # NOTE: copy, because every step below works in place and the caller owns `logits`.
        logits = logits.to(torch.float32, copy=True)
        device = logits.device
        params = [r.sampling_params for r in requests]

        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        # Logprobs are taken before any processing ("raw_logprobs", vLLM's default).
        raw_logprobs = torch.log_softmax(logits[lp_rows], dim=-1) if lp_rows else None

        apply_min_tokens(logits, requests)
        apply_penalties(logits, requests, self.states)

        # Greedy rows take the argmax of the penalised logits; random rows overwrite theirs.
        sampled = logits.argmax(dim=-1)
        rand_rows = [i for i, p in enumerate(params) if not p.greedy]
        if rand_rows:
            rand_reqs = [requests[i] for i in rand_rows]
            rows = torch.tensor(rand_rows, device=device)
            sampled[rows] = _sample_random(logits[rows], rand_reqs, self.states)

        token_ids = sampled.tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(requests)
        if raw_logprobs is not None:
            gathered = _gather_logprobs(raw_logprobs, sampled, lp_rows, params)
            for i, lp in zip(lp_rows, gathered, strict=True):
                logprobs[i] = lp
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs)


def apply_min_tokens(logits: torch.Tensor, requests: list[Request]) -> None:
    """In place on logits [B, V]: until a request has min_tokens outputs, mask to -inf every
    token that would stop it (stop_token_ids, and eos unless ignore_eos, like vLLM)."""
    rows: list[int] = []
    cols: list[int] = []
    vocab = logits.shape[1]
    for i, r in enumerate(requests):
        if not _min_tokens_active(r):
            continue
        p = r.sampling_params
        banned = set(p.stop_token_ids)
        if not p.ignore_eos:  # with ignore_eos, eos does not stop, so needs no mask
            banned.update(r.eos_token_ids)
        for t in banned:
            if 0 <= t < vocab:
                rows.append(i)
                cols.append(t)
    if rows:
        device = logits.device
        idx = (torch.tensor(rows, device=device), torch.tensor(cols, device=device))
        logits.index_put_(idx, torch.tensor(-math.inf, device=device))


def apply_penalties(
    logits: torch.Tensor, requests: list[Request], states: RowStates | None = None
) -> None:
    """In place on logits [B, V]: vLLM/HF penalties, only on the P rows that use any.

    repetition: tokens seen in prompt or output, logit > 0 -> logit / r, else logit * r.
    frequency: -= f * (count in output). presence: -= p * (token occurs in output).
    states: where prompt masks are cached (the sampler's; None: not kept).
    """
    states = states if states is not None else RowStates()
    pen_rows = [i for i, r in enumerate(requests) if _has_penalties(r.sampling_params)]
    if not pen_rows:
        return
    reqs = [requests[i] for i in pen_rows]
    device = logits.device
    vocab = logits.shape[1]
    rows = torch.tensor(pen_rows, device=device)
    sub = logits[rows]  # [P, V] copy; written back at the end

    # Pad with `vocab`: padding scatters into a spare column V that is then dropped.
    max_out = max(r.num_output_tokens for r in reqs)
    padded = [r.output_token_ids + [vocab] * (max_out - r.num_output_tokens) for r in reqs]
    out_ids = torch.tensor(padded, dtype=torch.long, device=device).view(len(reqs), max_out)
    counts = torch.zeros(len(reqs), vocab + 1, device=device)
    counts.scatter_add_(1, out_ids, torch.ones_like(out_ids, dtype=counts.dtype))
    counts = counts[:, :vocab]  # [P, V] occurrences in the output
    out_mask = counts > 0

    rep = [r.sampling_params.repetition_penalty for r in reqs]
    if any(x != 1.0 for x in rep):
        seen = out_mask | torch.stack([_prompt_mask(states.of(r), r, vocab, device) for r in reqs])
        scale = torch.where(seen, torch.tensor(rep, device=device).unsqueeze(1), 1.0)
        sub = torch.where(sub > 0, sub / scale, sub * scale)
    freq = torch.tensor([r.sampling_params.frequency_penalty for r in reqs], device=device)
    pres = torch.tensor([r.sampling_params.presence_penalty for r in reqs], device=device)
    sub -= freq.unsqueeze(1) * counts
    sub -= pres.unsqueeze(1) * out_mask
    logits[rows] = sub


def _sample_random(logits: torch.Tensor, reqs: list[Request], states: RowStates) -> torch.Tensor:
    """logits: [R, V] copy of the random rows. Returns [R] sampled ids."""
    device = logits.device
    params = [r.sampling_params for r in reqs]
    vocab = logits.shape[1]
    temps = [max(p.temperature, _MIN_TEMPERATURE) for p in params]
    logits.div_(torch.tensor(temps, device=device).unsqueeze(1))

    if any(p.min_p > 0.0 for p in params):
        # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p); log(0) = -inf masks none.
        log_min_p = torch.tensor([p.min_p for p in params], device=device).log().unsqueeze(1)
        cutoff = logits.max(dim=-1, keepdim=True).values + log_min_p
        logits.masked_fill_(logits < cutoff, -math.inf)

    use_k = any(p.top_k > 0 for p in params)
    use_p = any(p.top_p < 1.0 for p in params)
    if use_k or use_p:
        top_k = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params] if use_k else None
        top_p = [p.top_p for p in params] if use_p else None
        logits = _apply_top_k_top_p(logits, top_k, top_p)

    probs = logits.softmax(dim=-1)
    # Exponential race: argmax(p / q), q ~ Exp(1), draws from p (what vLLM does). Seeded
    # rows draw their own q from their own generator, so batch mates cannot shift them.
    q = torch.empty_like(probs)
    seeded = [i for i, p in enumerate(params) if p.seed is not None]
    if len(seeded) < len(params):
        q.exponential_()
    for i in seeded:
        q[i].exponential_(generator=_generator(states.of(reqs[i]), reqs[i], device))
    return probs.div_(q).argmax(dim=-1)


def _apply_top_k_top_p(
    logits: torch.Tensor, top_k: list[int] | None, top_p: list[float] | None
) -> torch.Tensor:
    """Masks to -inf what falls outside top_k / top_p, per row. logits: [R, V]."""
    device = logits.device
    sorted_logits, order = logits.sort(dim=-1, descending=False)  # ascending: best is last
    vocab = logits.shape[1]
    if top_k is not None:
        k = torch.tensor(top_k, device=device)
        kth_best = sorted_logits.gather(1, (vocab - k).unsqueeze(1))
        sorted_logits.masked_fill_(sorted_logits < kth_best, -math.inf)
    if top_p is not None:
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        p = torch.tensor(top_p, device=device).unsqueeze(1)
        drop = cum <= 1.0 - p
        drop[:, -1] = False  # always keep the best token
        sorted_logits.masked_fill_(drop, -math.inf)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _gather_logprobs(
    raw_logprobs: torch.Tensor,
    sampled: torch.Tensor,
    lp_rows: list[int],
    params: list[SamplingParams],
) -> list[TokenLogprob]:
    """raw_logprobs: [L, V] log_softmax of the raw logits of the rows in lp_rows."""
    rows = torch.tensor(lp_rows, device=sampled.device)
    return token_logprobs(raw_logprobs, sampled[rows], [params[i].logprobs or 0 for i in lp_rows])


def token_logprobs(logprobs: torch.Tensor, ids: torch.Tensor, ks: list[int]) -> list[TokenLogprob]:
    """logprobs [L, V], ids [L]: each row's logprob of ids[row] and its top ks[row] tokens."""
    chosen = logprobs.gather(1, ids.unsqueeze(1)).squeeze(1).tolist()
    k_max = min(max(ks), logprobs.shape[1])
    top_vals: list[list[float]] = [[] for _ in ks]
    top_ids: list[list[int]] = [[] for _ in ks]
    if k_max > 0:
        vals, idx = logprobs.topk(k_max, dim=-1)  # [L, k_max], sorted descending
        top_vals, top_ids = vals.tolist(), idx.tolist()
    return [
        TokenLogprob(
            token_id=tok, logprob=lp, top=tuple(zip(top_ids[j][:k], top_vals[j][:k], strict=True))
        )
        for j, (tok, lp, k) in enumerate(zip(ids.tolist(), chosen, ks, strict=True))
    ]


def _generator(state: _RowState, r: Request, device: torch.device) -> torch.Generator:
    """The request's own generator, created on first use and seeded with params.seed."""
    if state.generator is None or state.generator.device != device:
        state.generator = torch.Generator(device=device)
        state.generator.manual_seed(r.sampling_params.seed)
    return state.generator


def _prompt_mask(state: _RowState, r: Request, vocab: int, device: torch.device) -> torch.Tensor:
    """[V] bool of prompt tokens, cached: the prompt never changes, rebuilding it costs O(L)."""
    mask = state.prompt_mask
    if mask is None or mask.device != device or mask.shape[0] != vocab:
        mask = torch.zeros(vocab, dtype=torch.bool, device=device)
        ids = torch.tensor(r.prompt_token_ids, dtype=torch.long, device=device)
        mask[ids[(ids >= 0) & (ids < vocab)]] = True
        state.prompt_mask = mask
    return mask
