"""Turns a SchedulerOutput into tensors, runs the model over the paged KV cache, samples.

Shapes: T scheduled tokens, Bd decoding sequences (one new token each), N KV blocks,
B block size, L layers, P parts per layer, Hkv KV heads (rows per part), D floats per row
(the model's KVFormat: K and V of Hkv heads, or MLA's one latent row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from serve_app.engine.outputs import SamplerOutput
from serve_app.engine.request import Request
from serve_app.engine.sampler import Sampler, token_logprobs
from serve_app.engine.scheduler import SchedulerOutput
from serve_app.lora.batch import LoraBatch
from serve_app.model.config import ModelSpec
from serve_app.model.decoder import CausalLM, MicroBatch
from serve_app.model.layers.attention import (
    AttentionMetadata,
    DecodeGroup,
    GatherWorkspace,
    PrefillSeq,
)
from serve_app.platform.transfer import tensor_to_device, to_device

# Decodes are attended in groups of similar context length: padding every sequence to the
# longest one in the batch wastes gather bandwidth when lengths vary (64..768 is typical).
DECODE_GROUP_SIZE = 16
# Smallest micro-batch worth a second round of expert calls.
MIN_MICRO_BATCH = 4


@dataclass(frozen=True, slots=True)
class StepResult:
    """Requests that reached the end of their known tokens this step, and what they sampled."""

    requests: list[Request]
    sampled: SamplerOutput


@dataclass(frozen=True, slots=True)
class _Built:
    """One micro-batch's model inputs, and which of its rows sample for which request."""

    batch: MicroBatch
    sample_rows: list[int]
    sample_reqs: list[Request]
    # (request, first row, first position) of chunks whose prompt logprobs are wanted
    prompt_lp: list[tuple[Request, int, int]]


def split_micro_batches(sched: SchedulerOutput, num_micro_batches: int) -> list[list[int]]:
    """Request indices of each micro-batch: one, unless experts are remote and the step
    has enough decodes to split.

    NOTE: a request admitted this step may read prefix blocks that a prefill in the same
    step is still writing (their hashes are published at allocation), so every prefill
    and every new admission stays in micro-batch 0; only decodes of requests that were
    already running (their KV is complete) are spread, to balance the token counts.
    """
    n = len(sched.requests)
    if num_micro_batches < 2 or n < 2 * MIN_MICRO_BATCH:
        return [list(range(n))]
    first_new = sched.num_running_scheduled
    fixed = [i for i in range(n) if i >= first_new or sched.num_new_tokens[i] != 1]
    free = [i for i in range(first_new) if sched.num_new_tokens[i] == 1]
    if len(free) < MIN_MICRO_BATCH:
        return [list(range(n))]
    # decodes sorted by context length, so each half keeps similar lengths for attention
    free.sort(key=lambda i: sched.requests[i].num_computed_tokens)
    tokens0 = sum(sched.num_new_tokens[i] for i in fixed)
    half = (tokens0 + len(free)) // 2
    take = min(max(half - tokens0, 0), len(free) - MIN_MICRO_BATCH)
    first, second = fixed + free[:take], free[take:]
    return [first, second] if first else [second]


def kv_block_bytes(spec: ModelSpec, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return spec.kv_format.elements_per_token(spec.num_layers) * block_size * elem


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
        num_micro_batches: int = 1,
    ):
        spec = model.spec
        self.num_micro_batches = num_micro_batches
        self.num_split_steps = 0  # steps run as two micro-batches
        self.model = model
        self.block_size = block_size
        self.device = device
        fmt = spec.kv_format
        shape = (num_blocks, block_size, fmt.heads, fmt.dim)
        self.kv_caches = [
            tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(fmt.parts))
            for _ in range(spec.num_layers)
        ]
        self.sampler = Sampler()
        self._block_offsets = torch.arange(block_size, device=device)
        self._workspace = GatherWorkspace()

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, block_ids: dict[str, list[int]]) -> StepResult:
        split = split_micro_batches(sched, self.num_micro_batches)
        self.num_split_steps += len(split) > 1
        parts = [self._build(sched, idx, block_ids) for idx in split]
        hidden = self.model.forward_micro_batches([p.batch for p in parts], self.kv_caches)
        for h, p in zip(hidden, parts, strict=True):
            for req, row, start in p.prompt_lp:
                self._prompt_logprobs(h, req, row, start)
        rows = [
            h[tensor_to_device(p.sample_rows, self.device)]
            for h, p in zip(hidden, parts, strict=True)
        ]
        sample_reqs = [r for p in parts for r in p.sample_reqs]
        if not sample_reqs:
            return StepResult([], SamplerOutput([], []))
        logits = self.model.compute_logits(torch.cat(rows) if len(rows) > 1 else rows[0])
        return StepResult(sample_reqs, self.sampler(logits, sample_reqs))

    def _prompt_logprobs(self, hidden: torch.Tensor, req: Request, row: int, start: int) -> None:
        """Append to req.prompt_logprobs the logprobs of the prompt tokens that this chunk
        (rows from `row`, positions from `start`) predicts; positions already recorded (before
        a preemption) are skipped."""
        first = len(req.prompt_logprobs)  # predicts prompt token first + 1
        stop = min(req.num_computed_tokens, req.num_prompt_tokens - 1)
        if stop <= first or first < start:
            return
        h = hidden[row + first - start : row + stop - start]
        lps = torch.log_softmax(self.model.compute_logits(h).float(), dim=-1)
        targets = tensor_to_device(req.prompt_token_ids[first + 1 : stop + 1], self.device)
        k = req.sampling_params.prompt_logprobs or 0
        req.prompt_logprobs.extend(token_logprobs(lps, targets, [k] * len(targets)))

    def _build(
        self, sched: SchedulerOutput, indices: list[int], block_ids: dict[str, list[int]]
    ) -> _Built:
        bs = self.block_size

        # Decodes (one new token) first, shortest context first: attention batches them.
        def order_key(i: int) -> tuple[bool, int]:
            return sched.num_new_tokens[i] != 1, sched.requests[i].num_computed_tokens

        order = sorted(indices, key=order_key)
        ids: list[int] = []
        positions: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillSeq] = []
        sample_rows: list[int] = []
        sample_reqs: list[Request] = []
        prompt_lp: list[tuple[Request, int, int]] = []
        slot_parts: list[torch.Tensor] = []
        # each row's LoRA adapter (None: the base model); no per-row list in a step without one
        row_adapters: list | None = (
            [] if any(sched.requests[i].lora is not None for i in order) else None
        )
        for i in order:
            req, n = sched.requests[i], sched.num_new_tokens[i]
            if row_adapters is not None:
                row_adapters.extend([req.lora] * n)
            start = req.num_computed_tokens - n  # scheduler already advanced it
            end = start + n
            table = block_ids[req.request_id]
            tok_off = len(ids)
            ids.extend(req.all_token_ids[start:end])
            positions.extend(range(start, end))
            if n == 1:
                decode_tables.append(table)
                decode_lens.append(end)
            else:
                bt = tensor_to_device(table[: -(-end // bs)], self.device)
                slots = (bt[:, None] * bs + self._block_offsets).reshape(-1)
                slot_parts.append(slots[start:end])
                prefills.append(PrefillSeq(tok_off, n, end, bt))
            if end == req.num_tokens:
                sample_rows.append(tok_off + n - 1)
                sample_reqs.append(req)
            if req.sampling_params.prompt_logprobs is not None and start < req.num_prompt_tokens:
                prompt_lp.append((req, tok_off, start))

        groups = []
        for g in range(0, len(decode_lens), DECODE_GROUP_SIZE):
            lens = decode_lens[g : g + DECODE_GROUP_SIZE]
            max_blocks = -(-max(lens) // bs)
            blocks = tensor_to_device(
                [
                    t[:max_blocks] + [0] * (max_blocks - len(t))
                    for t in decode_tables[g : g + DECODE_GROUP_SIZE]
                ],
                self.device,
            )
            ctx = tensor_to_device(lens, self.device)
            last_block = blocks.gather(1, ((ctx - 1) // bs)[:, None]).squeeze(1)
            slot_parts.insert(len(groups), last_block * bs + (ctx - 1) % bs)
            groups.append(DecodeGroup(g, blocks, ctx))
        meta = AttentionMetadata(
            slot_mapping=torch.cat(slot_parts),
            decode_groups=groups,
            prefills=prefills,
            workspace=self._workspace,
        )
        input_ids = tensor_to_device(ids, self.device)
        pos = tensor_to_device(positions, self.device)
        lora = None if row_adapters is None else LoraBatch.build(row_adapters, self.device)
        batch = MicroBatch(input_ids, pos, meta, lora)
        return _Built(batch, sample_rows, sample_reqs, prompt_lp)

    # ---- whole-block copies for the shared prefix cache (L layers, n blocks) ----------------

    @torch.inference_mode()
    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """Whole blocks, [n, L, P, B, Hkv, D], on the cache's device and dtype."""
        idx = tensor_to_device(block_ids, self.device)
        return torch.stack(
            [torch.stack([part[idx] for part in layer], 1) for layer in self.kv_caches], 1
        )

    @torch.inference_mode()
    def write_blocks(self, block_ids: list[int], kv: torch.Tensor) -> None:
        """Overwrite whole blocks with kv [n, L, P, B, Hkv, D] (any device, cast as needed)."""
        idx = tensor_to_device(block_ids, self.device)
        kv = to_device(kv, self.device, self.kv_caches[0][0].dtype)
        for layer, parts in enumerate(self.kv_caches):
            for p, part in enumerate(parts):
                part.index_copy_(0, idx, kv[:, layer, p])
