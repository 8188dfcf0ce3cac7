"""The router-replica autoscaling policy: a pure `decide`, and the thin Ray Serve adapter.

`decide(signals, current, config, state, now) -> Decision(target, state)` scales up fast (a queue,
a TTFT SLO breach or KV pressure), down slowly (one replica at a time, only after low load has
held for `downscale_delay_s`), and holds when the signals it needs are missing. The clock is an
argument, so tests need no Ray and no sleeping. `serve_policy(ctx)` is the `(ctx) -> (target,
state_dict)` function Ray Serve 2.60 calls; see docs/autoscaling.md for how to deploy it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from autoscaling.signals import FleetSignals, aggregate, signals_by_replica


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """Thresholds of the router policy; every field is validated on construction."""

    min_replicas: int = 1  # fewest replicas; the target never goes below
    max_replicas: int = 4  # most replicas; the target never goes above
    target_running_per_replica: float = 32.0  # running sequences one replica should carry
    max_waiting_per_replica: float = 2.0  # queued requests per replica above which we scale up
    kv_high: float = 0.9  # KV-cache use fraction (fullest replica) that counts as pressure
    ttft_slo_ms: float = 1000.0  # P90 TTFT objective; the replicas' mean above it is a breach
    upscale_step: int = 1  # replicas added on an SLO or KV breach (a queue may add more)
    upscale_cooldown_s: float = 30.0  # wait after a scale-up so new replicas can start and report
    downscale_delay_s: float = 300.0  # low load must hold this long before each step down
    downscale_band: float = 0.6  # low load: the fleet minus one replica stays under band x limits

    def __post_init__(self) -> None:
        if self.min_replicas < 0:
            raise ValueError(f"min_replicas must be >= 0, got {self.min_replicas}")
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})"
            )
        for name in ("target_running_per_replica", "ttft_slo_ms"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.max_waiting_per_replica >= 0:
            raise ValueError(
                f"max_waiting_per_replica must be >= 0, got {self.max_waiting_per_replica}"
            )
        if not 0 < self.kv_high <= 1:
            raise ValueError(f"kv_high must be in (0, 1], got {self.kv_high}")
        if self.upscale_step < 1:
            raise ValueError(f"upscale_step must be >= 1, got {self.upscale_step}")
        for name in ("upscale_cooldown_s", "downscale_delay_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.downscale_band < 1:
            raise ValueError(f"downscale_band must be in (0, 1), got {self.downscale_band}")


@dataclass(frozen=True, slots=True)
class PolicyState:
    """What the policy remembers between ticks (times are seconds on the caller's clock)."""

    low_since: float | None = None  # when the current stretch of low load began
    last_scale_up_at: float | None = None  # when the policy last raised the target

    def to_dict(self) -> dict[str, float | None]:
        return {"low_since": self.low_since, "last_scale_up_at": self.last_scale_up_at}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PolicyState:
        """Read back `to_dict`; Serve's own keys in the dict and ill-typed values are ignored."""

        def num(key: str) -> float | None:
            v = d.get(key)
            return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

        return cls(low_since=num("low_since"), last_scale_up_at=num("last_scale_up_at"))


class Decision(NamedTuple):
    target: int
    state: PolicyState


def _wants_up(s: FleetSignals, n: int, cfg: PolicyConfig) -> int | None:
    """The target a breach calls for, or None when there is none."""
    up = None
    if n == 0 and s.requests:  # scaled to zero and a request waits at a handle: cold start
        up = 1
    if s.kv_use_max is not None and s.kv_use_max >= cfg.kv_high:
        up = n + cfg.upscale_step
    # A fleet-wide (mean) breach is a capacity problem; one slow replica alone is a routing one.
    if s.ttft_p90_mean_ms is not None and s.ttft_p90_mean_ms > cfg.ttft_slo_ms:
        up = n + cfg.upscale_step
    if s.waiting is not None and s.waiting > cfg.max_waiting_per_replica * max(n, 1):
        # Size for the whole demand at once (scale up fast), but by at least one step.
        demand = (s.waiting + (s.running or 0.0)) / cfg.target_running_per_replica
        up = max(up or 0, n + cfg.upscale_step, math.ceil(demand))
    return up


def _is_low(s: FleetSignals, n: int, cfg: PolicyConfig) -> bool:
    """Whether n - 1 replicas would carry the present load with `downscale_band` headroom."""
    # Every replica must have reported: an unreported one may hide load (hold on missing data).
    if s.reporting < n or s.waiting is None or s.running is None or s.kv_use_max is None:
        return False
    if s.waiting > 0:
        return False
    if s.ttft_p90_max_ms is not None and s.ttft_p90_max_ms > cfg.downscale_band * cfg.ttft_slo_ms:
        return False
    if n == 1:  # scaling to zero: only when nothing runs, and nothing waits at a handle either
        return s.running == 0 and not s.requests
    # Load spreads over one replica fewer; KV use of the fullest replica scales the same way.
    spread = n / (n - 1)
    return (
        s.running / (n - 1) <= cfg.downscale_band * cfg.target_running_per_replica
        and s.kv_use_max * spread <= cfg.downscale_band * cfg.kv_high
    )


def decide(
    signals: FleetSignals,
    current_replicas: int,
    config: PolicyConfig,
    state: PolicyState,
    now: float,
) -> Decision:
    """The target replica count and the next state; pure, `now` is the caller's clock.

    `current_replicas` is the target already committed (Serve's `target_num_replicas`), so
    replicas that are still starting count as capacity and are not asked for twice.
    """
    n = current_replicas
    if n < config.min_replicas or n > config.max_replicas:
        bounded = min(max(n, config.min_replicas), config.max_replicas)
        return Decision(bounded, PolicyState(last_scale_up_at=state.last_scale_up_at))

    up = _wants_up(signals, n, config)
    if up is not None:
        # A cold start from zero never waits for the cooldown: a request is waiting for it.
        cooling = (
            n > 0
            and state.last_scale_up_at is not None
            and (now - state.last_scale_up_at < config.upscale_cooldown_s)
        )
        target = min(up, config.max_replicas)
        if cooling or target <= n:
            return Decision(n, PolicyState(last_scale_up_at=state.last_scale_up_at))
        return Decision(target, PolicyState(last_scale_up_at=now))

    if n <= config.min_replicas or not _is_low(signals, n, config):
        return Decision(n, PolicyState(last_scale_up_at=state.last_scale_up_at))
    low_since = state.low_since if state.low_since is not None else now
    if now - low_since >= config.downscale_delay_s:
        # One step down; the next one needs another full delay of low load.
        return Decision(n - 1, PolicyState(low_since=now, last_scale_up_at=state.last_scale_up_at))
    return Decision(n, PolicyState(low_since=low_since, last_scale_up_at=state.last_scale_up_at))


DEFAULT_CONFIG = PolicyConfig()


def serve_policy(ctx: Any, config: PolicyConfig = DEFAULT_CONFIG) -> tuple[int, dict[str, Any]]:
    """Ray Serve 2.60 custom policy: `AutoscalingContext -> (target, policy_state)`.

    Bounds come from the deployment (`capacity_adjusted_{min,max}_replicas`), signals from the
    replicas' `record_autoscaling_stats` (`ctx.aggregated_metrics`), state from
    `ctx.policy_state`. Serve wraps this function with its own delays and scaling factors;
    set those to neutral values (docs/autoscaling.md) so this policy alone decides.
    """
    if ctx.current_time is None:  # no clock, no timing decisions: hold
        return ctx.target_num_replicas, dict(ctx.policy_state)
    cfg = replace(
        config,
        min_replicas=ctx.capacity_adjusted_min_replicas,
        max_replicas=ctx.capacity_adjusted_max_replicas,
    )
    per_replica = signals_by_replica(ctx.aggregated_metrics or {})
    fleet = aggregate(per_replica[r] for r in ctx.running_replicas if r in per_replica)
    fleet = replace(fleet, requests=ctx.total_num_requests)
    state = PolicyState.from_dict(ctx.policy_state)
    target, new_state = decide(fleet, ctx.target_num_replicas, cfg, state, ctx.current_time)
    return target, new_state.to_dict()


class ServePolicy:
    """`serve_policy` with thresholds from the app config, in the form Serve 2.60 configures.

    Serve passes `AutoscalingPolicy.policy_kwargs` only to a class (instantiated once on the
    controller, then called every tick); a plain function gets none. The builder selects
    `autoscaling.policy:ServePolicy` with the `PolicyConfig` fields of `router.autoscaling` as
    kwargs; the bounds still come from the deployment on every tick.
    """

    def __init__(self, **policy_kwargs: Any):
        self.config = PolicyConfig(**policy_kwargs)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        return serve_policy(ctx, self.config)
