"""`moeserve serve` / `moeserve stop`: the engine behind the OpenAI API in one local process.

--background starts the server as its own process session, records its PID in .run/, waits
until /health answers, and prints the URL and a curl example. `stop` ends that PID only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from serve_app.procs import pid_alive, stop_session
from serve_app.tools.run_files import (
    LOG_FILE,
    PID_FILE,
    RUN_DIR,
    failure_cause,
    log_since,
    log_size,
    read_pid,
)

STOP_TIMEOUT_S = 60


def run_server(args: argparse.Namespace) -> int:
    if args.ray:
        from serve_app.tools.ray_server import run_ray_server, shared_cache_preflight

        problem = shared_cache_preflight(args)
        if problem:
            print(problem, file=sys.stderr)
            return 1
    if args.background:
        return _start_background(args)
    if args.ray:
        return run_ray_server(args)
    import uvicorn

    from serve_app.api.routes import create_app
    from serve_app.engine.config import ConfigError, EngineConfig
    from serve_app.engine.parts import quantization
    from serve_app.lora.peft_format import LoraError
    from serve_app.metrics import get_metrics
    from serve_app.metrics.reporter import start_engine_reporter
    from serve_app.model.loader import check_quantization
    from serve_app.model.quant.scheme import QuantizationError
    from serve_app.runtime.factory import build_async_engine
    from serve_app.tools.local_client import LocalEngineClient

    try:
        config = EngineConfig(
            model=args.model,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            kv_cache_memory_gb=args.kv_cache_memory_gb,
            quantization=args.quantization,
            quantization_group_size=args.quantization_group_size,
            lora_adapters=tuple(args.lora or ()),
            max_loras=args.max_loras,
            max_loras_per_batch=args.max_loras_per_batch,
            max_cpu_loras=args.max_cpu_loras,
            max_lora_memory_gb=args.max_lora_memory_gb,
            dtype=args.dtype,
        )
    except ConfigError as e:
        print(f"error: --{e.field.replace('_', '-')} {e.message}", file=sys.stderr)
        return 2
    try:
        check_quantization(config.model, quantization(config))
    except QuantizationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        engine = build_async_engine(config)
    except LoraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = args.served_model_name or Path(args.model).resolve().name
    app = create_app(
        LocalEngineClient(engine, name),
        stream_interval=args.stream_interval,
        unknown_fields=args.unknown_fields,
    )
    reporter = start_engine_reporter(get_metrics(), engine, name, "local")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    reporter.stop()
    engine.shutdown()
    return 0


def _start_background(args: argparse.Namespace) -> int:
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    if pid_alive(read_pid()):
        print(f"already running (pid {read_pid()}); `make stop` first", file=sys.stderr)
        return 1
    argv = [a for a in sys.argv[1:] if a != "--background"]
    start = log_size()
    with open(LOG_FILE, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "serve_app.cli", *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    PID_FILE.write_text(str(proc.pid))
    url = f"http://{args.host}:{args.port}"
    from serve_app.api.routes import api_keys_from_env

    # with MOESERVE_API_KEY set the server wants it on /v1 too: the poll sends one of the keys
    keys = sorted(api_keys_from_env())
    auth = {"Authorization": f"Bearer {keys[0]}"} if keys else {}
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            print(exit_line(proc.returncode, log_since(start)), file=sys.stderr)
            return 1
        try:
            request = urllib.request.Request(f"{url}/v1/models", headers=auth)
            with urllib.request.urlopen(request, timeout=2) as r:
                model = json.load(r)["data"][0]["id"]
            break
        except OSError:
            time.sleep(0.5)
    else:
        cause = failure_cause(log_since(start))
        print(f"server not ready after 600 s (last: {cause}); see {LOG_FILE}", file=sys.stderr)
        stop_server()
        return 1
    body = json.dumps({"model": model, "prompt": "Once upon a time", "max_tokens": 32})
    print(f"moeserve is up at {url} (pid {proc.pid}, log {LOG_FILE})")
    print(f"  {_prefix_cache_line(url, args.ray)}")
    key_header = ' -H "Authorization: Bearer $MOESERVE_API_KEY"' if keys else ""
    print(
        f"  curl {url}/v1/completions{key_header} -H 'Content-Type: application/json' -d '{body}'"
    )
    print("  stop it with: make stop")
    return 0


def exit_line(returncode: int, log: str) -> str:
    """The one line a background start that failed prints: the exit status and why (from the
    lines this start wrote to the log)."""
    cause = failure_cause(log) or "it wrote nothing to its log"
    return f"server exited with {returncode}: {cause} (full log: {LOG_FILE})"


def _prefix_cache_line(url: str, ray: bool) -> str:
    """Where the shared prefix cache is, as /health reports it."""
    from serve_app.kvstore.stats import describe_store

    off = "single process: nothing to share" if not ray else "disabled in the app config"
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
            health = json.load(r)
    except urllib.error.HTTPError as e:  # 503 while degraded: the body still says it
        health = json.load(e)
    except OSError as e:
        return f"shared prefix cache: unknown (/health did not answer: {e})"
    return describe_store((health.get("prefix_cache") or {}).get("store"), off)


def stop_command(_: argparse.Namespace) -> int:
    return stop_server()


def stop_server() -> int:
    pid = read_pid()
    if not pid_alive(pid):
        print("no moeserve server running")
        PID_FILE.unlink(missing_ok=True)
        return 0
    # --ray shuts Serve and its Ray down first: give it time, then end the rest of the session
    stop_session(pid, STOP_TIMEOUT_S)
    PID_FILE.unlink(missing_ok=True)
    print(f"stopped moeserve (pid {pid})")
    return 0
