"""`moeserve serve --ray`: a local Ray cluster owned by this process, with the Serve app on it.

This process is the Ray driver: ray.init() starts the head (no dashboard unless asked), Serve
listens on --port, and the app is deployed from an AppConfig built from the flags. SIGTERM or
Ctrl-C shuts Serve and that Ray down, so `moeserve stop` (by PID) leaves nothing behind, and
no other Ray on the machine is touched.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time

log = logging.getLogger(__name__)


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
        },
        "router": {
            "num_replicas": args.routers,
            "num_cpus": share,
            "num_threads": threads,
            "routing": getattr(args, "routing", "pow2"),
        },
        "experts": {"num_cpus": share, "num_threads": threads},
    }
    return AppConfig.model_validate(config)


def run_ray_server(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from serve_app.builder import build_app
    from serve_app.config import REDIS_URL_ENV
    from serve_app.tools.local_server import ADDRESS_FILE

    num_cpus = os.cpu_count() or 1
    config = app_config(args, num_cpus)
    if args.redis_url:
        # through the environment Ray's workers inherit, not the app config: a URL may hold a
        # password, and the config is visible to anyone who can read Serve's status
        os.environ[REDIS_URL_ENV] = args.redis_url
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=args.dashboard,
        dashboard_port=args.dashboard_port if args.dashboard else None,
        log_to_driver=False,
    )
    ADDRESS_FILE.parent.mkdir(parents=True, exist_ok=True)
    ADDRESS_FILE.write_text(ray.get_runtime_context().gcs_address)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(config), name="moeserve", route_prefix="/", blocking=False)
        log.warning("moeserve on Ray: %s", config.model_dump_json())
        while not stop.is_set():
            time.sleep(0.5)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            ADDRESS_FILE.unlink(missing_ok=True)
    return 0
