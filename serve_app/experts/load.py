"""Router-side counters of routed tokens per expert and per expert shard (cumulative).

Counted where the router splits each MoE layer's tokens by shard (RemoteExperts.submit), so
they are summed over layers: a token that reaches 2 layers counts twice. `expert_tokens[e]`
counts (token, slot) pairs routed to expert e; `shard_tokens[s]` counts the token rows sent to
shard s. Rebalancing takes the difference of two snapshots (serve_app/experts/rebalance.py);
a Prometheus exporter can publish them as counters (`moeserve_expert_shard_tokens_total`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from serve_app.experts.dispatch import ShardSlice


class ExpertLoad(NamedTuple):
    expert_tokens: tuple[int, ...]
    shard_tokens: tuple[int, ...]


class ExpertLoadCounter:
    def __init__(self, num_experts: int, num_shards: int):
        self._experts = torch.zeros(num_experts, dtype=torch.int64)
        self._shards = [0] * num_shards

    def record(self, topk_ids: torch.Tensor, slices: Sequence[ShardSlice]) -> None:
        """topk_ids [T, K] of one MoE layer's batch, and the slices it was split into."""
        ids = topk_ids.reshape(-1).cpu()
        self._experts += torch.bincount(ids[ids >= 0], minlength=self._experts.numel())
        for sl in slices:
            self._shards[sl.shard] += sl.token_idx.numel()

    def snapshot(self) -> ExpertLoad:
        """A copy; safe to take from another thread (counts may be one layer apart)."""
        return ExpertLoad(tuple(self._experts.tolist()), tuple(self._shards))
