"""`make run`'s path: `moeserve serve --ray --background` starts a light local Ray with the app
(2 expert shards, HTTP through HAProxy), prints a working curl command, streams, and
`moeserve stop` ends all of it by PID."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from serve_app.platform import sched
from serve_app.procs import session_pids, thread_names
from serve_app.tools.ray_server import SHUT_DOWN_LINE
from tests.conftest import free_port, subprocess_env, tiny_model_dir
from tests.streaming_checks import check_slow_reader

pytestmark = pytest.mark.slow


def test_serve_ray_background_then_stop(tmp_path):
    env = subprocess_env(MOESERVE_RUN_DIR=str(tmp_path))
    port = free_port()
    cli = [sys.executable, "-m", "serve_app.cli"]
    model = str(tiny_model_dir("qwen3_moe"))
    up = subprocess.run(
        [*cli, "serve", "--model", model, "--port", str(port), "--ray", "--ep", "2"]
        + ["--background"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert up.returncode == 0, up.stderr + (tmp_path / "server.log").read_text()
    pid = int((tmp_path / "server.pid").read_text())
    try:
        curl = next(line for line in up.stdout.splitlines() if "curl " in line)
        out = subprocess.run(shlex.split(curl.strip()), capture_output=True, text=True)
        body = json.loads(out.stdout)  # sampled at temperature 1: may stop early on EOS
        assert 1 <= body["usage"]["completion_tokens"] <= 32, out.stdout
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        # streamed through HAProxy and the output channel, read slowly: every token once
        check_slow_reader(f"http://127.0.0.1:{port}", body["model"], "hello", max_tokens=16)
        check_sched_policies(pid)
    finally:
        down = subprocess.run([*cli, "stop"], env=env, capture_output=True, text=True)
    assert down.returncode == 0 and f"pid {pid}" in down.stdout
    assert session_pids(pid) == []  # its whole session, Ray's processes included, is gone
    log = (tmp_path / "server.log").read_text()
    # SIGTERM reached our handler (not Ray's, which exits the driver without shutting down)
    assert SHUT_DOWN_LINE in log and "SIGTERM received" not in log, log[-2000:]


def check_sched_policies(server_pid: int) -> None:
    """Throughput mode: Ray and the serving path at SCHED_BATCH, the engine's threads (the
    router's engine thread and the OpenMP workers it started; the expert shards) normal."""
    seen: dict[str, set[str]] = {}
    for pid in session_pids(server_pid):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
            threads = thread_names(pid)
        except OSError:
            continue
        for tid, comm in threads.items():
            if comm in ("moeserve-engine", "moeserve-kv-io"):  # the engine waits for kv-io
                role = "engine"
            elif "ExpertShard" in title:
                role = "shard"
            elif "ServeReplica" in title:
                role = title.rsplit(":", 1)[-1].split()[0]  # ingress | router
            else:
                role = Path(title.split(" ")[0]).name  # raylet, gcs_server, haproxy, ...
            try:
                seen.setdefault(role, set()).add(sched.policy_of(tid))
            except OSError:
                pass
    assert seen["engine"] == {"normal"} and seen["shard"] == {"normal"}, seen
    for role in ("router", "ingress", "raylet", "gcs_server", "haproxy"):
        assert seen.get(role) == {"batch"}, (role, seen)
