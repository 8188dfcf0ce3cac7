"""Sparse MoE block: gate + top-k routing here, expert execution behind an ExpertExecutor.

Routing follows the architectures' own code: softmax over all experts in float32, top-k, and a
renormalisation of the k weights when the config says so (always for Mixtral). Qwen2-MoE adds a
shared expert for every token, scaled by a sigmoid gate (the DeepSeek-MoE idea).
Shapes: T tokens, D hidden, E experts, K experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from serve_app.model.config import ModelSpec
from serve_app.model.expert_executor import ExpertExecutor, ExpertFuture
from serve_app.model.layers.mlp import GatedMLP


def route(
    gate_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_logits [T, E] -> (topk_ids [T, K], topk_weights [T, K] in the logits' dtype)."""
    probs = F.softmax(gate_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights.to(gate_logits.dtype)


class SparseMoeBlock(nn.Module):
    def __init__(self, spec: ModelSpec, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.top_k = spec.top_k
        self.renormalize = spec.norm_topk_prob
        self.gate = nn.Linear(spec.hidden_size, spec.num_experts, bias=False)
        self.shared_expert: GatedMLP | None = None
        if spec.shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(
                spec.hidden_size, spec.shared_expert_intermediate_size, spec.hidden_act
            )
            self.shared_expert_gate = nn.Linear(spec.hidden_size, 1, bias=False)
        self.experts: ExpertExecutor | None = None  # attached after weights are loaded
        self.token_counts: torch.Tensor | None = None  # [E] shared by all layers, see below

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.submit(x).result()

    def submit(self, x: torch.Tensor) -> ExpertFuture:
        """Route and start the experts; the shared expert runs here while they work."""
        ids, weights = route(self.gate(x), self.top_k, self.renormalize)
        assert self.experts is not None, "experts not attached"
        if self.token_counts is not None:
            self.token_counts += torch.bincount(ids.flatten(), minlength=len(self.token_counts))
        routed = self.experts.submit(self.layer_idx, x, ids, weights)
        if self.shared_expert is None:
            return routed
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return _PlusShared(routed, shared)


def count_expert_tokens(model: nn.Module, num_experts: int) -> torch.Tensor | None:
    """Make every MoE layer of `model` add its routed tokens per expert into one [E] tensor
    (summed over layers and top-k slots) and return it; None for a dense model."""
    blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
    if not blocks:
        return None
    device = blocks[0].gate.weight.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    for b in blocks:
        b.token_counts = counts
    return counts


class _PlusShared(ExpertFuture):
    __slots__ = ("routed", "shared")

    def __init__(self, routed: ExpertFuture, shared: torch.Tensor):
        self.routed, self.shared = routed, shared

    def result(self) -> torch.Tensor:
        return self.routed.result() + self.shared
