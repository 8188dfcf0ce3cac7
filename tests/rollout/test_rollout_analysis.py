"""The pure rollout verdict: thresholds, thin data, failure limit, comparison with stable."""

import pytest

from serve_app.rollout.analysis import Verdict, VersionMetrics, analyze
from serve_app.rollout.state import AnalysisConfig

CFG = AnalysisConfig(min_samples=100)


def healthy(requests=1000, **kw) -> VersionMetrics:
    values = dict(
        requests=requests, errors=0, ttft_p99_ms=200.0, e2e_p99_ms=900.0, samples=requests
    )
    values.update(kw)
    return VersionMetrics(**values)


def test_defaults_are_the_documented_thresholds():
    cfg = AnalysisConfig()
    assert (cfg.max_error_rate, cfg.max_ttft_p99_ms, cfg.failure_limit) == (0.01, 500.0, 1)
    assert cfg.max_e2e_p99_ms is None and cfg.max_ratio_to_stable is None


def test_promote_when_within_thresholds():
    assert analyze(healthy(), CFG) == Verdict("promote", "within thresholds")
    # exactly at the limits is still fine: rules are strictly "over"
    assert analyze(healthy(errors=10, ttft_p99_ms=500.0), CFG).kind == "promote"


def test_rollback_on_error_rate():
    v = analyze(healthy(errors=11), CFG)
    assert v == Verdict("rollback", "error rate 1.10% > 1.00%", breach=True)


def test_rollback_on_ttft_and_e2e_latency():
    assert analyze(healthy(ttft_p99_ms=750.0), CFG) == Verdict(
        "rollback", "TTFT P99 750 ms > 500 ms", breach=True
    )
    cfg = AnalysisConfig(min_samples=100, max_e2e_p99_ms=2000.0)
    assert analyze(healthy(e2e_p99_ms=2500.0), cfg).reason == "E2E P99 2500 ms > 2000 ms"
    assert analyze(healthy(e2e_p99_ms=2500.0), CFG).kind == "promote"  # no E2E limit by default
    both = analyze(healthy(errors=50, ttft_p99_ms=600.0), CFG)
    assert both.reason == "error rate 5.00% > 1.00%; TTFT P99 600 ms > 500 ms"


def test_inconclusive_with_few_samples():
    v = analyze(healthy(requests=99, errors=50), CFG)
    assert v == Verdict("inconclusive", "99 requests < min_samples 100")
    # enough requests but too few latency samples: latency cannot be judged...
    v = analyze(healthy(samples=10, ttft_p99_ms=9000.0), CFG)
    assert v == Verdict("inconclusive", "10 latency samples < min_samples 100")
    # ...but the error rate still can
    assert analyze(healthy(errors=500, samples=0), CFG).kind == "rollback"


def test_failure_limit_holds_until_the_nth_consecutive_failure():
    cfg = AnalysisConfig(min_samples=100, failure_limit=3)
    bad = healthy(errors=20)
    assert analyze(bad, cfg, consecutive_failures=0) == Verdict(
        "hold", "error rate 2.00% > 1.00% (failure 1 of 3)", breach=True
    )
    assert analyze(bad, cfg, consecutive_failures=1).kind == "hold"
    assert analyze(bad, cfg, consecutive_failures=2).kind == "rollback"
    assert analyze(healthy(), cfg, consecutive_failures=2).kind == "promote"


def test_relative_to_stable():
    cfg = AnalysisConfig(min_samples=100, max_ratio_to_stable=1.5)
    stable = healthy(errors=2, ttft_p99_ms=100.0)
    v = analyze(healthy(errors=4, ttft_p99_ms=160.0), cfg, stable=stable)
    assert v.kind == "rollback"
    assert v.reason == (
        "error rate 0.40% > 1.5 x stable's 0.20%; TTFT P99 160 ms > 1.5 x stable's 100 ms"
    )
    assert analyze(healthy(errors=3, ttft_p99_ms=150.0), cfg, stable=stable).kind == "promote"
    # a stable with no errors does not turn every candidate error into a failure
    assert analyze(healthy(errors=5), cfg, stable=healthy()).kind == "promote"
    # a thin stable window is not a baseline
    assert analyze(healthy(ttft_p99_ms=300.0), cfg, stable=healthy(50, ttft_p99_ms=1.0)).kind == (
        "promote"
    )


@pytest.mark.parametrize(
    "kw",
    [
        dict(max_error_rate=1.5),
        dict(max_ttft_p99_ms=0),
        dict(min_samples=0),
        dict(failure_limit=0),
        dict(max_ratio_to_stable=0.5),
        dict(scale_down_delay_s=-1),
    ],
)
def test_config_rejects_bad_values(kw):
    with pytest.raises(ValueError):
        AnalysisConfig(**kw)


def test_metrics_reject_more_errors_than_requests():
    with pytest.raises(ValueError, match="errors <= requests"):
        VersionMetrics(requests=1, errors=2)
