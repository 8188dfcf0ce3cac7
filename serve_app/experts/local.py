"""Experts held in this process, stacked per layer as [E, 2I, D] (gate|up) and [E, D, I] (down).

Tokens are grouped by expert so each expert runs one batched matmul over all its tokens.
Shapes: T tokens, K experts per token, E experts, D hidden, I expert intermediate size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from serve_app.experts.base import ExpertExecutor


class ExpertWeights:
    """The experts of one MoE layer, or of the subset of them a shard owns."""

    __slots__ = ("w13", "w2", "expert_ids")

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, expert_ids: list[int]):
        self.w13 = w13  # [E_local, 2I, D]
        self.w2 = w2  # [E_local, D, I]
        self.expert_ids = expert_ids


def run_experts(
    w: ExpertWeights, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
) -> torch.Tensor:
    """sum over k of weight * expert(x) for the experts in `w`; other experts contribute 0.

    An id of -1 marks a slot that another shard serves: it is skipped like any foreign expert.
    """
    num_tokens, k = topk_ids.shape
    out = torch.zeros_like(x)
    sentinel = max(w.expert_ids) + 1  # sorts after every owned expert
    flat_ids = topk_ids.reshape(-1)
    flat_ids = flat_ids.masked_fill(flat_ids < 0, sentinel)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=sentinel + 1).tolist()
    token_idx = order // k
    weights = topk_weights.reshape(-1)[order].to(x.dtype)
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    for local, expert in enumerate(w.expert_ids):
        s, e = starts[expert], starts[expert + 1]
        if s == e:
            continue
        idx = token_idx[s:e]
        gate_up = F.linear(x[idx], w.w13[local])
        gate, up = gate_up.chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w.w2[local]) * weights[s:e, None]
        out.index_add_(0, idx, y)
    return out


class LocalExperts(ExpertExecutor):
    """All experts of all MoE layers, in this process."""

    def __init__(self, layers: dict[int, ExpertWeights]):
        self.layers = layers

    def forward(
        self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        return run_experts(self.layers[layer], x, topk_ids, topk_weights)
