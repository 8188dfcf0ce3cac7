"""Split routed tokens by expert shard, and add the shards' answers back together.

Each shard receives only the tokens that have at least one of their top-k experts on it; the
other (token, k) slots of those tokens are masked (id -1, weight 0), so a shard never computes
an expert it was not asked for. An expert held by several shards (a replicated hot expert) is
served by copy `t % copies` for token t: the load of that expert splits evenly.
Shapes: T tokens, K experts per token, D hidden, Ts tokens sent to shard s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from serve_app.experts.placement import Placement
from serve_app.platform.transfer import to_device


@dataclass(frozen=True, slots=True)
class ShardSlice:
    """What one shard gets: rows of the batch (token_idx [Ts]) with masked ids and weights."""

    shard: int
    token_idx: torch.Tensor  # [Ts] int64 into the T tokens
    x: torch.Tensor  # [Ts, D]
    topk_ids: torch.Tensor  # [Ts, K], -1 where another shard serves that slot
    topk_weights: torch.Tensor  # [Ts, K], 0 where masked


class Dispatcher:
    def __init__(self, placement: Placement):
        self.placement = placement
        reps = placement.replicas()
        width = max(len(r) for r in reps)
        # copy j of expert e lives on shard_of[e, j]; rows padded by repeating their copies
        self.shard_of = torch.tensor([[r[j % len(r)] for j in range(width)] for r in reps])
        self.num_copies = torch.tensor([len(r) for r in reps])

    def split(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> list[ShardSlice]:
        """One slice per shard that has work; shards with no routed token are left out."""
        t = topk_ids.shape[0]
        ids_cpu = topk_ids.cpu()
        copy = torch.arange(t)[:, None] % self.num_copies[ids_cpu]
        target = self.shard_of[ids_cpu, copy]  # [T, K] shard serving each slot
        out = []
        for s in range(self.placement.num_shards):
            mine = target == s
            rows = mine.any(dim=1).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            m = mine[rows].to(topk_ids.device)
            idx = rows.to(x.device)
            out.append(
                ShardSlice(
                    s,
                    idx,
                    x[idx],
                    torch.where(m, topk_ids[idx], -1),
                    torch.where(m, topk_weights[idx], 0),
                )
            )
        return out

    @staticmethod
    def combine(like: torch.Tensor, parts: list[tuple[ShardSlice, torch.Tensor]]) -> torch.Tensor:
        """Sum the shards' [Ts, D] answers into a [T, D] tensor shaped like `like`."""
        out = torch.zeros_like(like)
        for sl, y in parts:
            out.index_add_(0, sl.token_idx, to_device(y, out.device, out.dtype))
        return out
