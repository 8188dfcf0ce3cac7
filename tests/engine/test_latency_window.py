"""RecentLatencies: nearest-rank quantiles over a time window and a sample cap (no clock)."""

from __future__ import annotations

import pytest

from serve_app.engine.latency_window import RecentLatencies


def test_nearest_rank_p90_is_an_observed_value():
    w = RecentLatencies(window_s=60)
    for i, v in enumerate([50, 10, 40, 30, 20, 60, 70, 80, 90, 100]):
        w.add(float(i), float(v))
    assert w.quantile(0.9, now=10) == 90  # rank ceil(0.9 * 10) = 9 of 10
    assert w.quantile(0.5, now=10) == 50
    assert w.quantile(1.0, now=10) == 100


def test_samples_older_than_the_window_are_dropped():
    w = RecentLatencies(window_s=10)
    w.add(0.0, 500.0)
    w.add(5.0, 20.0)
    assert w.quantile(0.9, now=10) == 500
    assert w.quantile(0.9, now=10.5) == 20  # the 500 ms sample left the window
    assert len(w) == 1
    assert w.quantile(0.9, now=100) is None  # idle: no recent TTFT, not 0
    assert len(w) == 0


def test_the_sample_cap_keeps_the_newest():
    w = RecentLatencies(window_s=60, max_samples=3)
    for i, v in enumerate([1000, 1, 2, 3]):
        w.add(float(i), float(v))
    assert len(w) == 3 and w.quantile(1.0, now=4) == 3


def test_empty_window_and_bad_arguments():
    assert RecentLatencies().quantile(0.9, now=0) is None
    with pytest.raises(ValueError):
        RecentLatencies(window_s=0)
    with pytest.raises(ValueError):
        RecentLatencies(max_samples=0)
    with pytest.raises(ValueError):
        RecentLatencies().quantile(0, now=0)
