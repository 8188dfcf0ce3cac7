"""Per-version request outcomes over a sliding window, summarised for the analysis. Pure.

The ingress reports each finished request (version, ok, TTFT, end-to-end latency); the rollout
controller stamps it with its own clock on arrival (ingress replicas may run on other nodes with
other clocks) and asks for one version's `VersionMetrics` over the last `window_s` seconds.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from serve_app.engine.latency_window import nearest_rank
from serve_app.rollout.analysis import VersionMetrics


@dataclass(frozen=True, slots=True)
class Outcome:
    """One finished request. ok=False: a server-side failure (5xx, engine error), the kind the
    error-rate gate counts; client errors (4xx) are not reported at all. target: the LoRA
    adapter whose version this is (serve_app/rollout/adapter.py), None for a model version."""

    version: str
    ok: bool
    ttft_ms: float | None = None
    e2e_ms: float | None = None
    target: str | None = None

    def to_list(self) -> list:
        return [self.version, self.ok, self.ttft_ms, self.e2e_ms, self.target]

    @classmethod
    def from_list(cls, item: list) -> Outcome:
        version, ok, ttft, e2e, *rest = item  # 4 items: from an ingress of an older build
        target = rest[0] if rest else None
        return cls(str(version), bool(ok), _ms(ttft), _ms(e2e), target)


def _ms(value) -> float | None:
    return None if value is None else float(value)


def p99(values: list[float]) -> float | None:
    """Nearest-rank 99th percentile; None for no values."""
    return nearest_rank(values, 0.99)


class OutcomeWindow:
    """Outcomes kept for `horizon_s` seconds (the longest window anyone asks for)."""

    def __init__(self, horizon_s: float, max_items: int = 200_000):
        self.horizon_s = horizon_s
        self._items: deque[tuple[float, Outcome]] = deque(maxlen=max_items)
        # The Ray adapter records on its event loop while an operator event runs in a thread.
        self._lock = threading.Lock()

    def add(self, outcome: Outcome, now: float) -> None:
        with self._lock:
            self._items.append((now, outcome))
            self._expire(now)

    def clear(self, version: str | None = None) -> None:
        """Forget one version's outcomes (a new rollout of a reused name), or all."""
        with self._lock:
            if version is None:
                self._items.clear()
            else:
                kept = [x for x in self._items if x[1].version != version]
                self._items = deque(kept, maxlen=self._items.maxlen)

    def metrics(self, version: str, now: float, window_s: float) -> VersionMetrics:
        with self._lock:
            self._expire(now)
            since = now - window_s
            outs = [o for at, o in self._items if at >= since and o.version == version]
        ttft = [o.ttft_ms for o in outs if o.ok and o.ttft_ms is not None]
        e2e = [o.e2e_ms for o in outs if o.ok and o.e2e_ms is not None]
        return VersionMetrics(
            requests=len(outs),
            errors=sum(not o.ok for o in outs),
            ttft_p99_ms=p99(ttft),
            e2e_p99_ms=p99(e2e),
            samples=len(e2e),
        )

    def _expire(self, now: float) -> None:
        while self._items and self._items[0][0] < now - self.horizon_s:
            self._items.popleft()
