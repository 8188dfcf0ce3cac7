"""The expert balancer's decisions: which placement the routers use, and when to move weights.

Pure state (no Ray, no sleeping; the clock is passed in); serve_app.deployments.balancer_actor runs
it in the app. Router replicas report (cumulative per-expert tokens, the placement generation
they dispatch by) every `sync_interval_s` and get the current generation back. The balancer
sums the routers' token deltas over `window_s`; once a full window is measured and
`plan_rebalance` returns a plan, the moves run in the no-drop order of rebalance.py:

1. every shard loads its `add` experts (the actor waits for them), then `publish` makes the
   plan's placement generation + 1;
2. each router switches at its next sync and reports the new generation;
3. `step` returns the `Drop` only when every router seen in the last `router_timeout_s`
   reports the new generation. NOTE: a router that registers meanwhile is recorded with the
   generation it was handed, so it never holds the drop back with a placement it does not use.

`missing(held)` gives what each shard lacks of the placements in use (both while draining),
so a shard that the Serve controller recreated from the config's placement is topped up.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from serve_app.experts.placement import Placement
from serve_app.experts.rebalance import RebalanceConfig, RebalancePlan, plan_rebalance, window_load


@dataclass(frozen=True, slots=True)
class BalancerConfig:
    """When the balancer acts; validated on construction."""

    rebalance: RebalanceConfig = field(default_factory=RebalanceConfig)
    interval_s: float = 5.0  # how often the balancer loop runs (plan, drop, top up shards)
    window_s: float = 60.0  # load window; a plan needs a full window of reports
    sync_interval_s: float = 1.0  # how often each router reports and pulls the placement
    router_timeout_s: float = 10.0  # a router silent this long is gone (no longer awaited)

    def __post_init__(self) -> None:
        if min(self.interval_s, self.window_s, self.sync_interval_s) <= 0:
            raise ValueError("interval_s, window_s and sync_interval_s must be > 0")
        if self.router_timeout_s <= 2 * self.sync_interval_s:
            raise ValueError("router_timeout_s must exceed 2 x sync_interval_s")


class Versioned(NamedTuple):
    generation: int
    placement: Placement


class Drop(NamedTuple):
    experts: tuple[tuple[int, ...], ...]  # experts[s]: what shard s may free now


@dataclass(slots=True)
class _RouterReport:
    seen: float
    generation: int
    tokens: tuple[int, ...] | None  # last cumulative snapshot; None until its first report


class Balancer:
    def __init__(self, initial: Placement, config: BalancerConfig, now: float):
        self.config = config
        self.current = Versioned(0, initial)
        self._previous: Placement | None = None  # still in use by some router while draining
        self._drop: Drop | None = None
        self._routers: dict[str, _RouterReport] = {}
        self._deltas: deque[tuple[float, list[int]]] = deque()
        self._window_start = now

    @property
    def draining(self) -> bool:
        return self._drop is not None

    def register(self, router: str, now: float) -> Versioned:
        """A router starting up: it will dispatch by the placement returned."""
        self._routers[router] = _RouterReport(now, self.current.generation, None)
        return self.current

    def report(
        self,
        router: str,
        expert_tokens: Sequence[int],
        used: Versioned,
        now: float,
    ) -> Versioned:
        """A router's periodic report; returns the placement it should switch to."""
        if used.generation > self.current.generation:
            # NOTE: this balancer was recreated (state lost): adopt the newest placement the
            # routers use instead of sending them back to the config's.
            self.current = used
        tokens = tuple(expert_tokens)
        r = self._routers.get(router)
        if r is not None and r.tokens is not None:
            self._deltas.append((now, window_load(r.tokens, tokens)))
        self._routers[router] = _RouterReport(now, used.generation, tokens)
        return self.current

    def window(self, now: float) -> list[int]:
        """Tokens per expert reported within the last window_s, all routers summed."""
        while self._deltas and self._deltas[0][0] <= now - self.config.window_s:
            self._deltas.popleft()
        total = [0] * self.current.placement.num_experts
        for _, delta in self._deltas:
            total = [a + b for a, b in zip(total, delta, strict=True)]
        return total

    def step(self, now: float) -> RebalancePlan | Drop | None:
        """The next move: a plan to load (then `publish`), a drop to run (then `dropped`)."""
        timeout = self.config.router_timeout_s
        for name in [n for n, r in self._routers.items() if r.seen < now - timeout]:
            del self._routers[name]
        load = self.window(now)
        if self._drop is not None:
            gen = self.current.generation
            return self._drop if all(r.generation >= gen for r in self._routers.values()) else None
        if now - self._window_start < self.config.window_s:
            return None
        return plan_rebalance(self.current.placement, load, self.config.rebalance)

    def publish(self, plan: RebalancePlan, now: float) -> Versioned:
        """Every shard holds plan.add: routers may switch. Measures a fresh window after."""
        self._previous = self.current.placement
        self.current = Versioned(self.current.generation + 1, plan.placement)
        self._drop = Drop(plan.drop)
        self._deltas.clear()
        self._window_start = now
        return self.current

    def dropped(self) -> None:
        self._previous, self._drop = None, None

    def required(self) -> tuple[tuple[int, ...], ...]:
        """What each shard must hold now: the current placement, plus the previous one while
        a router may still dispatch by it."""
        shards = self.current.placement.shards
        if self._previous is None:
            return shards
        return tuple(
            tuple(sorted(set(a) | set(b)))
            for a, b in zip(shards, self._previous.shards, strict=True)
        )

    def missing(self, held: Sequence[Sequence[int] | None]) -> tuple[tuple[int, ...], ...]:
        """Experts each shard lacks of `required()`; () for a shard whose holdings are unknown."""
        return tuple(
            () if h is None else tuple(sorted(set(need) - set(h)))
            for need, h in zip(self.required(), held, strict=True)
        )
