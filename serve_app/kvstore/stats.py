"""Counters of the shared KV tier: plain fields, snapshotted into EngineStats and /health."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# Upper bounds (ms) of the lookup-latency buckets; the last bucket is everything above.
LATENCY_BUCKETS_MS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 250.0, 1000.0)


@dataclass(slots=True)
class LatencyHistogram:
    """Cumulative-free histogram: counts[i] = observations in (bounds[i-1], bounds[i]]."""

    bounds_ms: tuple[float, ...] = LATENCY_BUCKETS_MS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))
    count: int = 0
    sum_ms: float = 0.0
    max_ms: float = 0.0

    def observe(self, ms: float) -> None:
        self.counts[bisect.bisect_left(self.bounds_ms, ms)] += 1
        self.count += 1
        self.sum_ms += ms
        self.max_ms = max(self.max_ms, ms)

    def snapshot(self) -> dict:
        return {
            "bounds_ms": list(self.bounds_ms),
            "counts": list(self.counts),
            "count": self.count,
            "sum_ms": round(self.sum_ms, 3),
            "max_ms": round(self.max_ms, 3),
        }


@dataclass(frozen=True, slots=True)
class KVStoreStats:
    """One consistent snapshot of the tier's counters (cumulative since start)."""

    connected: bool
    blocks_published: int
    bytes_published: int
    publish_drops: int  # queue full: the block was not copied out
    publish_errors: int  # lost to an unavailable Redis (queued, or skipped while down)
    lookups: int
    lookup_timeouts: int
    blocks_fetched: int
    bytes_fetched: int
    fetch_failures: int  # a fetch that failed or timed out: its hits became misses
    corrupt_entries: int  # undecodable entries, counted as misses and deleted
    degradation_events: int  # transitions to "unavailable"
    lookup_latency: dict
    url: str | None = None  # the server's URL, password redacted (None before any connect)
    embedded: bool = False  # the node's embedded redis-server, started by moeserve
    last_error: str | None = None  # why it is not connected (None while connected)


def describe_store(store: dict | None, off_reason: str) -> str:
    """One line on where the shared prefix cache is, from /health's `prefix_cache.store`
    (a KVStoreStats as a dict; None when the engine has none, for `off_reason`)."""
    if store is None:
        return f"shared prefix cache: off ({off_reason})"
    url = store.get("url")
    where = url or "redis (no URL yet)"
    if store.get("embedded") and url:
        where = f"embedded redis-server at {url.split('//', 1)[1].split('/', 1)[0]}"
    if store.get("connected"):
        return f"shared prefix cache: {where} (connected)"
    why = store.get("last_error") or "not connected"
    return (
        f"shared prefix cache: NOT connected ({where}; {why}); serving from local compute "
        "and retrying"
    )
