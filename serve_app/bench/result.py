"""RunResult: what one system measured on one workload. Every system reports the same shape."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True, slots=True)
class RunResult:
    """output_tokens counts only what each request asked for (a static batch that ran past a
    short request's length does not get credit for the extra tokens)."""

    system: str
    workload: str
    output_tokens: int
    elapsed_s: float
    # 1-minute load average before and after: the machine is shared, so a run whose load rose
    # well above the core count was probably slowed by a neighbour.
    loadavg: tuple[float, float] = (0.0, 0.0)
    notes: list[str] = field(default_factory=list)

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_json(self) -> dict:
        return {**asdict(self), "output_tokens_per_s": self.output_tokens_per_s}


def loadavg_1m() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # not available on every platform
        return 0.0
