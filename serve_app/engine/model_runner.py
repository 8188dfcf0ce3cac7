"""Turns a SchedulerOutput into tensors, runs the model over the paged KV cache, samples.

Shapes: T scheduled tokens, Bd decoding sequences (one new token each), N KV blocks,
B block size, Hkv KV heads, D head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from serve_app.engine.outputs import SamplerOutput
from serve_app.engine.request import Request
from serve_app.engine.sampler import Sampler
from serve_app.engine.scheduler import SchedulerOutput
from serve_app.model.config import ModelSpec
from serve_app.model.decoder import CausalLM
from serve_app.model.layers.attention import (
    AttentionMetadata,
    DecodeGroup,
    GatherWorkspace,
    PrefillSeq,
)

# Decodes are attended in groups of similar context length: padding every sequence to the
# longest one in the batch wastes gather bandwidth when lengths vary (64..768 is typical).
DECODE_GROUP_SIZE = 16


@dataclass(frozen=True, slots=True)
class StepResult:
    """Requests that reached the end of their known tokens this step, and what they sampled."""

    requests: list[Request]
    sampled: SamplerOutput


def kv_block_bytes(spec: ModelSpec, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * elem


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        spec = model.spec
        self.model = model
        self.block_size = block_size
        self.device = device
        shape = (num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
            )
            for _ in range(spec.num_layers)
        ]
        self.sampler = Sampler()
        self._block_offsets = torch.arange(block_size, device=device)
        self._workspace = GatherWorkspace()

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, block_ids: dict[str, list[int]]) -> StepResult:
        bs = self.block_size

        # Decodes (one new token) first, shortest context first: attention batches them.
        def order_key(i: int) -> tuple[bool, int]:
            return sched.num_new_tokens[i] != 1, sched.requests[i].num_computed_tokens

        order = sorted(range(len(sched.requests)), key=order_key)
        ids: list[int] = []
        positions: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillSeq] = []
        sample_rows: list[int] = []
        sample_reqs: list[Request] = []
        slot_parts: list[torch.Tensor] = []
        for i in order:
            req, n = sched.requests[i], sched.num_new_tokens[i]
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
                bt = torch.tensor(table[: -(-end // bs)], device=self.device)
                slots = (bt[:, None] * bs + self._block_offsets).reshape(-1)
                slot_parts.append(slots[start:end])
                prefills.append(PrefillSeq(tok_off, n, end, bt if start > 0 else None))
            if end == req.num_tokens:
                sample_rows.append(tok_off + n - 1)
                sample_reqs.append(req)

        groups = []
        for g in range(0, len(decode_lens), DECODE_GROUP_SIZE):
            lens = decode_lens[g : g + DECODE_GROUP_SIZE]
            max_blocks = -(-max(lens) // bs)
            blocks = torch.tensor(
                [
                    t[:max_blocks] + [0] * (max_blocks - len(t))
                    for t in decode_tables[g : g + DECODE_GROUP_SIZE]
                ],
                device=self.device,
            )
            ctx = torch.tensor(lens, device=self.device)
            last_block = blocks.gather(1, ((ctx - 1) // bs)[:, None]).squeeze(1)
            slot_parts.insert(len(groups), last_block * bs + (ctx - 1) % bs)
            groups.append(DecodeGroup(g, blocks, ctx))
        meta = AttentionMetadata(
            slot_mapping=torch.cat(slot_parts),
            decode_groups=groups,
            prefills=prefills,
            workspace=self._workspace,
        )
        input_ids = torch.tensor(ids, device=self.device)
        pos = torch.tensor(positions, device=self.device)
        hidden = self.model(input_ids, pos, self.kv_caches, meta)
        if not sample_reqs:
            return StepResult([], SamplerOutput([], []))
        logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=self.device)])
        return StepResult(sample_reqs, self.sampler(logits, sample_reqs))

    # ---- whole-block copies for the shared prefix cache (L layers, n blocks) ----------------

    @torch.inference_mode()
    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """K/V of whole blocks, [n, L, 2, B, Hkv, D], on the cache's device and dtype."""
        idx = torch.tensor(block_ids, device=self.device)
        return torch.stack([torch.stack((k[idx], v[idx]), 1) for k, v in self.kv_caches], 1)

    @torch.inference_mode()
    def write_blocks(self, block_ids: list[int], kv: torch.Tensor) -> None:
        """Overwrite whole blocks with kv [n, L, 2, B, Hkv, D] (any device, cast as needed)."""
        idx = torch.tensor(block_ids, device=self.device)
        k0 = self.kv_caches[0][0]
        kv = kv.to(device=self.device, dtype=k0.dtype)
        for layer, (k, v) in enumerate(self.kv_caches):
            k.index_copy_(0, idx, kv[:, layer, 0])
            v.index_copy_(0, idx, kv[:, layer, 1])
