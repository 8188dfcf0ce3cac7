"""When and how to rebalance expert shards from their measured token load: pure decisions.

The routers count the tokens they route to each expert (`ExpertLoadCounter`, cumulative, summed
over MoE layers). Over a window (the difference of two snapshots) that is the per-expert load.
`plan_rebalance` decides: when the hottest shard carries more than `imbalance_threshold` x the
mean shard load, it recomputes the pure placement (`place_experts` with the load and spare
slots, which replicates the hottest experts) and returns it with the weight moves, only if
that lowers the imbalance by at least `min_gain`. The moves are ordered for no dropped
request: every shard loads its `add` experts first, then every router switches its dispatcher
to the new placement, and only then do shards drop their `drop` experts.
No torch, no Ray; counts in, a plan out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from serve_app.experts.placement import Placement, place_experts


@dataclass(frozen=True, slots=True)
class RebalanceConfig:
    """Thresholds for `plan_rebalance`; validated on construction."""

    imbalance_threshold: float = 1.5  # act when max shard load / mean shard load exceeds it
    min_gain: float = 0.1  # and the new placement lowers that ratio by at least this fraction
    min_tokens: int = 10_000  # ignore windows with less traffic than this (noise)
    spare_slots_per_shard: int = 1  # expert slots per shard beyond one copy of each expert

    def __post_init__(self) -> None:
        if not self.imbalance_threshold >= 1:
            raise ValueError(f"imbalance_threshold must be >= 1, got {self.imbalance_threshold}")
        if not 0 <= self.min_gain < 1:
            raise ValueError(f"min_gain must be in [0, 1), got {self.min_gain}")
        if self.min_tokens < 0 or self.spare_slots_per_shard < 0:
            raise ValueError("min_tokens and spare_slots_per_shard must be >= 0")


class RebalancePlan(NamedTuple):
    placement: Placement  # the placement to switch the routers to
    add: tuple[tuple[int, ...], ...]  # add[s]: experts shard s must load before the switch
    drop: tuple[tuple[int, ...], ...]  # drop[s]: experts shard s may free after the switch
    imbalance_before: float
    imbalance_after: float


def imbalance(placement: Placement, load: Sequence[float]) -> float:
    """Max over mean of the expected shard loads (1.0 = perfectly even; 1.0 with no load)."""
    shard = placement.shard_load(load)
    mean = sum(shard) / len(shard)
    return max(shard) / mean if mean > 0 else 1.0


def window_load(before: Sequence[int], after: Sequence[int]) -> list[int]:
    """Tokens per expert between two cumulative snapshots (a counter reset reads as restart)."""
    if len(before) != len(after):
        raise ValueError("snapshots of different expert counts")
    return [a - b if a >= b else a for b, a in zip(before, after, strict=True)]


def plan_rebalance(
    current: Placement, load: Sequence[float], config: RebalanceConfig
) -> RebalancePlan | None:
    """A better placement and its weight moves, or None to keep the current one."""
    if len(load) != current.num_experts:
        raise ValueError(f"load has {len(load)} experts, placement {current.num_experts}")
    if sum(load) < config.min_tokens:
        return None
    before = imbalance(current, load)
    if before <= config.imbalance_threshold:
        return None
    slots = min(
        -(-current.num_experts // current.num_shards) + config.spare_slots_per_shard,
        current.num_experts,
    )
    proposed = place_experts(current.num_experts, current.num_shards, load, slots)
    after = imbalance(proposed, load)
    if after > before * (1 - config.min_gain):
        return None
    add = tuple(
        tuple(sorted(set(new) - set(old)))
        for old, new in zip(current.shards, proposed.shards, strict=True)
    )
    drop = tuple(
        tuple(sorted(set(old) - set(new)))
        for old, new in zip(current.shards, proposed.shards, strict=True)
    )
    return RebalancePlan(proposed, add, drop, before, after)
