"""`moeserve serve --ray`'s Serve modes: the environment each one gives Ray (pure)."""

from __future__ import annotations

import pytest

from serve_app.tools.ray_server import serve_mode_env


def test_throughput_mode_slows_serves_loops_unless_told(monkeypatch) -> None:
    monkeypatch.delenv("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", raising=False)
    monkeypatch.delenv("RAY_SERVE_METRICS_EXPORT_INTERVAL_MS", raising=False)
    env = serve_mode_env("throughput")
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert env["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.5"
    assert env["RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"] == "1000"
    assert env["RAY_SERVE_HAPROXY_METRICS_PORT"] != env["RAY_SERVE_HAPROXY_STATS_PORT"]
    monkeypatch.setenv("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.1")
    monkeypatch.setenv("RAY_SERVE_METRICS_EXPORT_INTERVAL_MS", "100")
    env = serve_mode_env("throughput")
    assert env["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.1"
    assert env["RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"] == "100"


def test_standard_mode_is_serves_defaults() -> None:
    env = serve_mode_env("standard")
    assert env == {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}
    with pytest.raises(ValueError):
        serve_mode_env("fast")
