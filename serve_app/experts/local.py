"""Experts held in this process, stacked per layer as [E, D, 2I] (gate|up) and [E, I, D] (down).

Tokens are grouped by expert so each expert runs one batched matmul over all its tokens. The
weights are stored input-major (`x @ w`, not `F.linear(x, w)`): at the few tokens per expert of
a decode step MKL runs the transposed-weight form 2-4x slower (docs/benchmarks.md).
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
        self.w13 = w13  # [E_local, D, 2I]
        self.w2 = w2  # [E_local, I, D]
        self.expert_ids = expert_ids


def run_experts(
    w: ExpertWeights, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
) -> torch.Tensor:
    """sum over k of weight * expert(x) for the experts in `w`; other experts contribute 0.

    An id of -1 marks a slot that another shard serves: it is skipped like any foreign expert.
    The (token, k) slots are sorted by expert and gathered once; each expert then runs its two
    matmuls on its contiguous rows, and the activation, the routing weights and the scatter
    back run once over all rows (per-expert small ops cost as much as the matmuls at decode).
    """
    k = topk_ids.shape[1]
    flat_ids = topk_ids.reshape(-1)
    owned = _owned_lookup(w, flat_ids.device)
    sentinel = len(owned) - 1  # sorts after every owned expert
    clipped = flat_ids.clamp(0, sentinel)
    flat_ids = torch.where(owned[clipped] & (flat_ids >= 0), clipped, sentinel)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=sentinel + 1).tolist()
    n = len(order) - counts[sentinel]  # slots this layer's experts serve
    out = torch.zeros_like(x)
    if n == 0:
        return out
    order = order[:n]
    token_idx = order // k
    xs = x[token_idx]
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    inter = w.w2.shape[1]
    gate_up = xs.new_empty(n, 2 * inter)
    for local, expert in enumerate(w.expert_ids):
        s, e = starts[expert], starts[expert + 1]
        if s < e:
            torch.mm(xs[s:e], w.w13[local], out=gate_up[s:e])
    act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    y = xs.new_empty(n, x.shape[1])
    for local, expert in enumerate(w.expert_ids):
        s, e = starts[expert], starts[expert + 1]
        if s < e:
            torch.mm(act[s:e], w.w2[local], out=y[s:e])
    y *= topk_weights.reshape(-1)[order].to(x.dtype)[:, None]
    return out.index_add_(0, token_idx, y)


def _owned_lookup(w: ExpertWeights, device: torch.device) -> torch.Tensor:
    """[max id + 2] bool: True at the ids `w` holds; the last entry is the sentinel."""
    owned = torch.zeros(max(w.expert_ids) + 2, dtype=torch.bool, device=device)
    owned[w.expert_ids] = True
    return owned


class LocalExperts(ExpertExecutor):
    """All experts of all MoE layers, in this process."""

    def __init__(self, layers: dict[int, ExpertWeights]):
        self.layers = layers

    def forward(
        self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        return run_experts(self.layers[layer], x, topk_ids, topk_weights)
