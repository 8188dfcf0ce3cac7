"""The promote / hold / rollback verdict over one analysis window: a pure function.

Rules, in order (config = AnalysisConfig):
1. fewer than min_samples candidate requests -> inconclusive (no verdict on thin data);
2. error rate (errors / requests) > max_error_rate -> a failure;
3. fewer than min_samples latency samples -> inconclusive;
4. TTFT P99 > max_ttft_p99_ms, or E2E P99 > max_e2e_p99_ms -> a failure;
5. with max_ratio_to_stable set and a stable version with >= min_samples requests: the
   candidate's error rate (when stable's is above 0) or a P99 more than ratio x stable's -> a
   failure;
6. otherwise -> promote.
A failure is a rollback once it is the failure_limit-th in a row (consecutive_failures counts
the ones before this window); before that it is a hold, with `breach` set so the caller counts
it. The collector of the numbers (Prometheus, the ingress) lives elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from serve_app.rollout.state import AnalysisConfig

VerdictKind = Literal["promote", "hold", "rollback", "inconclusive"]


@dataclass(frozen=True, slots=True)
class VersionMetrics:
    """One version's numbers over the analysis window.

    requests: finished requests; errors: those that failed on the server's side (5xx);
    samples: requests with a latency measurement (the P99s are over these); a P99 is None when
    not measured.
    """

    requests: int
    errors: int
    ttft_p99_ms: float | None = None
    e2e_p99_ms: float | None = None
    samples: int = 0

    def __post_init__(self) -> None:
        if self.requests < 0 or self.samples < 0 or not 0 <= self.errors <= self.requests:
            raise ValueError(
                f"need 0 <= errors <= requests and samples >= 0, got errors={self.errors} "
                f"requests={self.requests} samples={self.samples}"
            )

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True, slots=True)
class Verdict:
    """kind: what to do; reason: why, for the operator; breach: a threshold was crossed."""

    kind: VerdictKind
    reason: str
    breach: bool = False


def _failures(
    cand: VersionMetrics, config: AnalysisConfig, stable: VersionMetrics | None
) -> list[str] | None:
    """The crossed thresholds; None when there is too little data to judge latency."""
    out = []
    if cand.error_rate > config.max_error_rate:
        out.append(f"error rate {cand.error_rate:.2%} > {config.max_error_rate:.2%}")
    ratio = config.max_ratio_to_stable
    compare = ratio is not None and stable is not None and stable.requests >= config.min_samples
    if compare and stable.errors and cand.error_rate > ratio * stable.error_rate:
        out.append(
            f"error rate {cand.error_rate:.2%} > {ratio:g} x stable's {stable.error_rate:.2%}"
        )
    if cand.samples < config.min_samples:
        return out or None
    checks = (
        ("TTFT P99", cand.ttft_p99_ms, config.max_ttft_p99_ms, stable and stable.ttft_p99_ms),
        ("E2E P99", cand.e2e_p99_ms, config.max_e2e_p99_ms, stable and stable.e2e_p99_ms),
    )
    for label, value, limit, stable_value in checks:
        if value is None:
            continue
        if limit is not None and value > limit:
            out.append(f"{label} {value:g} ms > {limit:g} ms")
        if compare and stable_value and stable.samples >= config.min_samples:
            if value > ratio * stable_value:
                out.append(f"{label} {value:g} ms > {ratio:g} x stable's {stable_value:g} ms")
    return out


def analyze(
    candidate: VersionMetrics,
    config: AnalysisConfig,
    stable: VersionMetrics | None = None,
    consecutive_failures: int = 0,
) -> Verdict:
    """The verdict on `candidate` for one window (rules in the module docstring)."""
    if candidate.requests < config.min_samples:
        return Verdict(
            "inconclusive", f"{candidate.requests} requests < min_samples {config.min_samples}"
        )
    failures = _failures(candidate, config, stable)
    if failures is None:
        return Verdict(
            "inconclusive",
            f"{candidate.samples} latency samples < min_samples {config.min_samples}",
        )
    if failures:
        n = consecutive_failures + 1
        what = "; ".join(failures)
        if n >= config.failure_limit:
            return Verdict("rollback", what, breach=True)
        return Verdict("hold", f"{what} (failure {n} of {config.failure_limit})", breach=True)
    return Verdict("promote", "within thresholds")
