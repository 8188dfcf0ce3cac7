"""The load signals a router replica reports, and their pure aggregation across replicas.

A replica reports `RouterSignals.to_stats()` from Serve's `record_autoscaling_stats` hook; the
controller averages each key over `look_back_period_s` per replica and hands the policy
`{metric: {replica_id: value}}`, which `signals_by_replica` turns back into `RouterSignals`.
A signal a replica cannot measure (no request finished yet, so no TTFT) is omitted, never
reported as 0: missing stays missing all the way to the policy.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass

# NOTE: Serve puts its own "running_requests" key in the same per-replica metrics dict, and a
# custom key of that name would overwrite it; hence the prefix.
WAITING_KEY = "moeserve_waiting_requests"
RUNNING_KEY = "moeserve_running_requests"
KV_USE_KEY = "moeserve_kv_cache_use"
TTFT_P90_KEY = "moeserve_ttft_p90_ms"


@dataclass(frozen=True, slots=True)
class RouterSignals:
    """One router replica's load; None means the replica did not report that signal."""

    waiting: float | None = None  # requests queued in the scheduler, not yet running
    running: float | None = None  # sequences in the running batch
    kv_use: float | None = None  # fraction of KV-cache blocks in use, 0..1
    ttft_p90_ms: float | None = None  # P90 time to first token over the recent window

    def to_stats(self) -> dict[str, float]:
        """The dict for Serve's `record_autoscaling_stats` (only numbers; missing keys left out)."""
        pairs = (
            (WAITING_KEY, self.waiting),
            (RUNNING_KEY, self.running),
            (KV_USE_KEY, self.kv_use),
            (TTFT_P90_KEY, self.ttft_p90_ms),
        )
        return {k: float(v) for k, v in pairs if v is not None}

    @classmethod
    def from_stats(cls, stats: Mapping[str, float | None]) -> RouterSignals:
        """Inverse of `to_stats`; unknown keys are ignored, None and NaN read as missing."""
        return cls(
            waiting=_number(stats.get(WAITING_KEY)),
            running=_number(stats.get(RUNNING_KEY)),
            kv_use=_number(stats.get(KV_USE_KEY)),
            ttft_p90_ms=_number(stats.get(TTFT_P90_KEY)),
        )


def _number(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


@dataclass(frozen=True, slots=True)
class FleetSignals:
    """Signals summed or reduced across replicas; a field is None when no replica reported it."""

    reporting: int = 0  # replicas that reported both queue signals (waiting and running)
    waiting: float | None = None  # sum over replicas
    running: float | None = None  # sum over replicas
    kv_use_max: float | None = None  # the fullest replica's KV cache
    ttft_p90_max_ms: float | None = None  # the slowest replica
    ttft_p90_mean_ms: float | None = None  # mean over replicas that reported a TTFT
    # Requests Serve itself counts for the deployment: queued at the callers' handles plus
    # running on replicas (`ctx.total_num_requests`). The only signal at 0 replicas.
    requests: float | None = None


def _present(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None]


def aggregate(replicas: Iterable[RouterSignals]) -> FleetSignals:
    """Sum the queues, take the max KV use, and the max and mean TTFT; None where none reported."""
    rs = list(replicas)
    waiting = _present(r.waiting for r in rs)
    running = _present(r.running for r in rs)
    kv = _present(r.kv_use for r in rs)
    ttft = _present(r.ttft_p90_ms for r in rs)
    return FleetSignals(
        reporting=sum(1 for r in rs if r.waiting is not None and r.running is not None),
        waiting=sum(waiting) if waiting else None,
        running=sum(running) if running else None,
        kv_use_max=max(kv) if kv else None,
        ttft_p90_max_ms=max(ttft) if ttft else None,
        ttft_p90_mean_ms=sum(ttft) / len(ttft) if ttft else None,
    )


def signals_by_replica(
    metrics: Mapping[str, Mapping[Hashable, float]],
) -> dict[Hashable, RouterSignals]:
    """Turn Serve's `{metric: {replica: value}}` into `{replica: RouterSignals}`."""
    keys = (WAITING_KEY, RUNNING_KEY, KV_USE_KEY, TTFT_P90_KEY)
    replicas = {r for k in keys for r in metrics.get(k, {})}
    return {
        r: RouterSignals.from_stats({k: metrics.get(k, {}).get(r) for k in keys}) for r in replicas
    }
