"""MoE gates: logits -> top-k expert ids and weights, one small class per routing rule.

Each follows its architecture's transformers code (the reference we match): softmax top-k
(Qwen, Mixtral), DeepSeek-V2's greedy / group-limited greedy softmax, DeepSeek-V3's sigmoid
scores with a selection-only correction bias and grouped top-k ("noaux_tc"). The rule is chosen
once at load (`make_routing_rule`); the MoE block only calls `route`.
Shapes: T tokens, E experts, G groups, K experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from serve_app.model.config import RoutingSpec


class RoutingRule:
    """route(logits [T, E] float32, bias [E] | None) -> (ids [T, K] int64, weights [T, K] f32)."""

    def __init__(self, spec: RoutingSpec):
        self.spec = spec

    def route(
        self, logits: torch.Tensor, bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class SoftmaxTopK(RoutingRule):
    def route(self, logits, bias=None):
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.spec.top_k, dim=-1)
        if self.spec.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights


def _group_mask(scores: torch.Tensor, group_scores: torch.Tensor, topk_group: int) -> torch.Tensor:
    """[T, E] bool: experts inside the topk_group best groups."""
    t, g = group_scores.shape
    best = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    return keep.unsqueeze(-1).expand(t, g, scores.shape[-1] // g).reshape(t, -1)


class GroupLimitedGreedy(RoutingRule):
    """DeepSeek-V2: softmax; 'greedy' top-k over all experts, 'group_limited_greedy' within the
    topk_group groups whose best expert scores highest; weights times routed_scaling_factor."""

    def route(self, logits, bias=None):
        s = self.spec
        scores = logits.softmax(dim=-1, dtype=torch.float32)
        if s.method == "group_limited_greedy":
            groups = scores.view(scores.shape[0], s.n_group, -1).max(dim=-1).values
            scores = scores.masked_fill(~_group_mask(scores, groups, s.topk_group), 0.0)
        weights, ids = torch.topk(scores, k=s.top_k, dim=-1, sorted=False)
        return ids, weights * s.scaling


class NoAuxTopK(RoutingRule):
    """DeepSeek-V3: sigmoid scores; experts chosen by score + correction bias within the
    topk_group groups whose two best (biased) scores sum highest; weights are the unbiased
    scores, renormalised when norm_topk_prob, times routed_scaling_factor."""

    def route(self, logits, bias=None):
        s = self.spec
        scores = logits.sigmoid()
        choice = scores if bias is None else scores + bias
        groups = choice.view(choice.shape[0], s.n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
        choice = choice.masked_fill(~_group_mask(choice, groups, s.topk_group), float("-inf"))
        ids = torch.topk(choice, k=s.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        if s.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights * s.scaling


_ROUTERS: dict[str, type[RoutingRule]] = {
    "softmax": SoftmaxTopK,
    "greedy": GroupLimitedGreedy,
    "group_limited_greedy": GroupLimitedGreedy,
    "noaux_tc": NoAuxTopK,
}


def make_routing_rule(spec: RoutingSpec) -> RoutingRule:
    return _ROUTERS[spec.method](spec)
