"""Which expert shard holds which experts: a pure function of counts and (optional) load.

Without load statistics, experts are split into contiguous, equal ranges (expert e on shard
e * num_shards // num_experts), as expert-parallel vLLM does. With per-expert load (tokens
routed over a window) and spare slots, the hottest experts get replicas (the EPLB idea) and
all copies are packed greedily onto the least-loaded shard, never two copies on one shard.
No torch, no Ray: the same inputs give the same placement on every router.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Placement:
    """shards[s] lists the expert ids shard s holds (sorted); an expert may be on several."""

    num_experts: int
    shards: tuple[tuple[int, ...], ...]

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def replicas(self) -> tuple[tuple[int, ...], ...]:
        """replicas()[e] = the shards holding expert e, in shard order."""
        out: list[list[int]] = [[] for _ in range(self.num_experts)]
        for s, experts in enumerate(self.shards):
            for e in experts:
                out[e].append(s)
        return tuple(tuple(r) for r in out)

    def shard_load(self, load: Sequence[float]) -> list[float]:
        """Expected load per shard when each expert's load is split evenly over its copies."""
        reps = self.replicas()
        return [sum(load[e] / len(reps[e]) for e in experts) for experts in self.shards]


def place_experts(
    num_experts: int,
    num_shards: int,
    load: Sequence[float] | None = None,
    slots_per_shard: int | None = None,
) -> Placement:
    """Place num_experts over num_shards.

    slots_per_shard (default: just enough for one copy of each expert) bounds how many experts
    a shard holds; spare slots hold replicas of the hottest experts when `load` is given.
    """
    if num_experts < 1 or num_shards < 1:
        raise ValueError("num_experts and num_shards must be >= 1")
    if num_shards > num_experts:
        raise ValueError(f"{num_shards} shards for {num_experts} experts: some would be empty")
    min_slots = -(-num_experts // num_shards)
    slots = min_slots if slots_per_shard is None else slots_per_shard
    if slots < min_slots:
        raise ValueError(f"slots_per_shard must be >= {min_slots} to hold every expert once")
    if slots > num_experts:
        raise ValueError("slots_per_shard must not exceed num_experts")
    if load is None:
        shards = [[] for _ in range(num_shards)]
        for e in range(num_experts):
            shards[e * num_shards // num_experts].append(e)
        return Placement(num_experts, tuple(tuple(s) for s in shards))
    if len(load) != num_experts or any(x < 0 for x in load):
        raise ValueError("load needs one non-negative value per expert")

    copies = _replica_counts(load, num_shards, slots * num_shards)
    # Longest-processing-time first: heaviest copy to the least-loaded shard with room.
    items = sorted(
        ((load[e] / copies[e], e) for e in range(num_experts) for _ in range(copies[e])),
        key=lambda x: (-x[0], x[1]),
    )
    shards = [[] for _ in range(num_shards)]
    totals = [0.0] * num_shards
    for weight, e in items:
        candidates = [s for s in range(num_shards) if len(shards[s]) < slots and e not in shards[s]]
        s = min(candidates, key=lambda s: (totals[s], len(shards[s]), s))
        shards[s].append(e)
        totals[s] += weight
    return Placement(num_experts, tuple(tuple(sorted(s)) for s in shards))


def _replica_counts(load: Sequence[float], num_shards: int, total_slots: int) -> list[int]:
    """One copy each, then spare slots to whichever expert has the most load per copy."""
    copies = [1] * len(load)
    for _ in range(total_slots - len(load)):
        best = max(
            (e for e in range(len(load)) if copies[e] < num_shards),
            key=lambda e: (load[e] / copies[e], -e),
            default=None,
        )
        if best is None or load[best] == 0:
            break
        copies[best] += 1
    return copies
