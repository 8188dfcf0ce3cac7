"""`moeserve serve --ray`'s Serve modes: the environment each one gives Ray (pure)."""

from __future__ import annotations

import pytest

from serve_app.tools.ray_server import serve_mode_env


def test_throughput_mode_slows_serves_loops_unless_told(monkeypatch) -> None:
    monkeypatch.delenv("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", raising=False)
    monkeypatch.delenv("RAY_SERVE_METRICS_EXPORT_INTERVAL_MS", raising=False)
    monkeypatch.delenv("MOESERVE_SERVING_SCHED", raising=False)
    for name in ("HAPROXY_METRICS", "HAPROXY_STATS", "FALLBACK_PROXY_HTTP", "FALLBACK_PROXY_GRPC"):
        monkeypatch.delenv(f"RAY_SERVE_{name}_PORT", raising=False)
    env = serve_mode_env("throughput")
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert env["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.5"
    assert env["RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"] == "1000"
    assert env["MOESERVE_SERVING_SCHED"] == "batch"
    ports = [
        env[name]
        for name in (
            "RAY_SERVE_HAPROXY_METRICS_PORT",
            "RAY_SERVE_HAPROXY_STATS_PORT",
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",  # Serve's default 8500, bound with SO_REUSEPORT
            "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
        )
    ]
    assert len(set(ports)) == 4 and "8500" not in ports and "9500" not in ports
    monkeypatch.setenv("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.1")
    monkeypatch.setenv("RAY_SERVE_METRICS_EXPORT_INTERVAL_MS", "100")
    monkeypatch.setenv("MOESERVE_SERVING_SCHED", "normal")
    env = serve_mode_env("throughput")
    assert env["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.1"
    assert env["RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"] == "100"
    assert env["MOESERVE_SERVING_SCHED"] == "normal"


def test_a_fallback_proxy_port_named_in_the_environment_is_kept(monkeypatch) -> None:
    monkeypatch.setenv("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "18500")
    assert serve_mode_env("throughput")["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"] == "18500"


def test_standard_mode_is_serves_defaults() -> None:
    env = serve_mode_env("standard")
    assert env == {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}
    with pytest.raises(ValueError):
        serve_mode_env("fast")


def test_free_ports_are_distinct() -> None:
    """Picked one at a time the kernel may hand out the same port twice (1 in ~200 batches of
    4 here): throughput mode's listeners would then clash and HAProxy would not start."""
    from serve_app.procs import free_ports

    for _ in range(50):
        ports = free_ports(4)
        assert len(set(ports)) == 4 and all(0 < p < 65536 for p in ports)


@pytest.mark.parametrize(
    "flag, expected", [([], "reject"), (["--unknown-fields", "ignore"], "ignore")]
)
def test_unknown_fields_flag_reaches_the_app_config(flag, expected) -> None:
    from serve_app.cli.main import build_parser
    from serve_app.tools.ray_server import app_config

    args = build_parser().parse_args(["serve", "--ray", "--model", "m", *flag])
    assert app_config(args, num_cpus=2).api.unknown_fields == expected


@pytest.mark.parametrize(
    "flag, expected",
    [
        ([], "write_through"),
        (["--prefix-write-policy", "write_through_selective"], "write_through_selective"),
    ],
)
def test_prefix_write_policy_flag_reaches_the_engines_store_config(flag, expected) -> None:
    from serve_app.cli.main import build_parser
    from serve_app.tools.ray_server import app_config

    args = build_parser().parse_args(["serve", "--ray", "--model", "m", *flag])
    assert app_config(args, num_cpus=2).kv_store_config().write_policy == expected


@pytest.mark.parametrize("flag, expected", [([], "auto"), (["--dtype", "bfloat16"], "bfloat16")])
def test_dtype_flag_reaches_the_engine_config(flag, expected) -> None:
    """`moeserve serve --ray` and `generate` (and `make run DTYPE=...`, which passes --dtype)."""
    from serve_app.cli.main import build_parser
    from serve_app.tools.ray_server import app_config

    args = build_parser().parse_args(["serve", "--ray", "--model", "m", *flag])
    assert app_config(args, num_cpus=2).engine_config().dtype == expected
    gen = build_parser().parse_args(["generate", "--model", "m", "--prompt", "x", *flag])
    assert gen.dtype == expected
