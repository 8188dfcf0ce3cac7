"""A bounded window of recent latencies and their quantiles (the router's P90 TTFT signal).

Pure and clock-free: the caller passes `now` (any monotonic clock, seconds) to both `add` and
`quantile`. Samples older than `window_s` are dropped, and at most `max_samples` are kept
(the oldest go first), so memory and the cost of a quantile are bounded under any load.
Safe to add from one thread and read from another (a lock guards the deque).
"""

from __future__ import annotations

import math
import threading
from collections import deque


def nearest_rank(values: list[float], q: float) -> float | None:
    """Nearest-rank q-quantile (0 < q <= 1) of `values`; None for none. A value that was
    actually observed, not an interpolation."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class RecentLatencies:
    def __init__(self, window_s: float = 60.0, max_samples: int = 1024):
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)
        self._lock = threading.Lock()

    def add(self, now: float, value: float) -> None:
        with self._lock:
            self._samples.append((now, value))

    def quantile(self, q: float, now: float) -> float | None:
        """Nearest-rank q-quantile (0 < q <= 1) of the samples within the window; None if none.

        Nearest rank, not interpolation: the result is a latency that was actually observed.
        """
        if not 0 < q <= 1:
            raise ValueError(f"q must be in (0, 1], got {q}")
        with self._lock:
            while self._samples and self._samples[0][0] < now - self.window_s:
                self._samples.popleft()
            values = [v for _, v in self._samples]
        return nearest_rank(values, q)

    def __len__(self) -> int:
        return len(self._samples)
