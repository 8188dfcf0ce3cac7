"""Sparse MoE block: gate + top-k routing here, expert execution behind an ExpertExecutor.

The routing rule (serve_app/model/layers/routing.py) follows the architecture's own code:
softmax top-k (Qwen, Mixtral), DeepSeek-V2's (group-limited) greedy, DeepSeek-V3's sigmoid
scores with a correction bias and grouped top-k; DeepSeek gates and their bias stay float32
whatever the model's dtype. A shared expert runs for every token: Qwen2-MoE's scaled by a
sigmoid gate (`shared_expert`), DeepSeek's added as it is (`shared_experts`).
Shapes: T tokens, D hidden, E experts, K experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from serve_app.lora import batch as lora
from serve_app.model.config import ModelSpec
from serve_app.model.expert_executor import ExpertExecutor, ExpertFuture
from serve_app.model.layers.linear import project
from serve_app.model.layers.mlp import GatedMLP
from serve_app.model.layers.routing import make_routing_rule


class Gate(nn.Module):
    """The gate's [E, D] weight (and DeepSeek-V3's [E] e_score_correction_bias), named as in
    the checkpoint (`mlp.gate.weight`). keep_fp32: the loader leaves it float32."""

    def __init__(self, hidden: int, num_experts: int, fp32: bool, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        self.e_score_correction_bias = (
            nn.Parameter(torch.zeros(num_experts), requires_grad=False) if bias else None
        )
        self.keep_fp32 = fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.keep_fp32:
            x = x.float()
        logits = F.linear(x, self.weight)
        batch = lora.current()
        if batch is not None:  # an adapter may adapt the router too (PEFT's all-linear does)
            batch.add_linear_(getattr(self, "lora_name", None), x, logits)
        return logits


class SparseMoeBlock(nn.Module):
    def __init__(self, spec: ModelSpec, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.rule = make_routing_rule(spec.routing)
        self.gate = Gate(
            spec.hidden_size,
            spec.num_experts,
            fp32=spec.routing.fp32_gate,
            bias=spec.routing.method == "noaux_tc",
        )
        self.shared_name: str | None = None
        if spec.shared_expert_intermediate_size:
            gated = spec.traits.shared_expert == "gated"
            self.shared_name = "shared_expert" if gated else "shared_experts"
            shared = GatedMLP(
                spec.hidden_size, spec.shared_expert_intermediate_size, spec.hidden_act
            )
            self.add_module(self.shared_name, shared)
            if gated:
                self.shared_expert_gate = nn.Linear(spec.hidden_size, 1, bias=False)
        self.experts: ExpertExecutor | None = None  # attached after weights are loaded
        self.token_counts: torch.Tensor | None = None  # [E] shared by all layers, see below

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.submit(x).result()

    def submit(self, x: torch.Tensor) -> ExpertFuture:
        """Route and start the experts; the shared expert runs here while they work."""
        ids, weights = self.rule.route(self.gate(x), self.gate.e_score_correction_bias)
        weights = weights.to(x.dtype)
        assert self.experts is not None, "experts not attached"
        if self.token_counts is not None:
            self.token_counts += torch.bincount(ids.flatten(), minlength=len(self.token_counts))
        routed = self.experts.submit(self.layer_idx, x, ids, weights)
        if self.shared_name is None:
            return routed
        shared = getattr(self, self.shared_name)(x)
        if self.shared_name == "shared_expert":
            shared = torch.sigmoid(project(x, self.shared_expert_gate)[0]) * shared
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
