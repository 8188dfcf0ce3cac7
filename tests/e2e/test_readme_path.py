"""The README's commands, as a new user runs them: `make run` (moeserve serve --ray
--background), then `moeserve rollout start candidate.yaml ...` with a plain candidate (model
and version only), `status` and `abort`; a candidate no node can host fails in bounded time
with one line naming the resource, and `abort` stops a deploy that is still pending. Also what
`make run` prints about the shared prefix cache and how soon /metrics shows a request."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest

from serve_app.kvstore.embedded import default_base_dir
from serve_app.procs import session_pids
from tests.conftest import free_port, subprocess_env, tiny_model_dir

pytestmark = pytest.mark.slow

README_START = ["--steps", "5,25,50,100", "--interval", "60s"]


@pytest.fixture(scope="module")
def make_run(tmp_path_factory):
    """`make run MODEL=<tiny>` without make: the same command line its recipe runs."""
    run_dir = tmp_path_factory.mktemp("run")
    env = subprocess_env(MOESERVE_RUN_DIR=str(run_dir))
    port = free_port()
    model = str(tiny_model_dir("qwen3_moe"))
    cli = [sys.executable, "-m", "serve_app.cli"]
    up = subprocess.run(
        [*cli, "serve", "--model", model, "--port", str(port), "--ray", "--ep", "0"]
        + ["--routers", "1", "--background"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert up.returncode == 0, up.stderr + (run_dir / "server.log").read_text()
    pid = int((run_dir / "server.pid").read_text())
    yield {"url": f"http://127.0.0.1:{port}", "env": env, "cli": cli, "model": model, "up": up}
    subprocess.run([*cli, "stop"], env=env, capture_output=True, text=True, timeout=180)
    assert session_pids(pid) == []


def moeserve(make_run, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*make_run["cli"], *args],
        env=make_run["env"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def candidate(tmp_path, make_run, version: str, extra: str = "") -> str:
    path = tmp_path / f"{version}.yaml"
    path.write_text(f"model: {make_run['model']}\nversion: {version}\n{extra}")
    return str(path)


def test_make_run_prints_where_the_shared_prefix_cache_is(make_run):
    lines = make_run["up"].stdout.splitlines()
    cache = [line.strip() for line in lines if "shared prefix cache" in line]
    assert len(cache) == 1, make_run["up"].stdout
    assert cache[0].startswith("shared prefix cache: embedded redis-server at 127.0.0.1:")
    assert cache[0].endswith("(connected)")
    store = httpx.get(make_run["url"] + "/health", timeout=30).json()["prefix_cache"]["store"]
    assert store["connected"] and store["embedded"] and store["last_error"] is None
    # the server is this app's: recorded under its Ray node's id, which no other app shares
    port = int(store["url"].rsplit(":", 1)[1].split("/")[0])
    states = [json.loads(p.read_text()) for p in default_base_dir().glob("ray-*/state.json")]
    assert [s["port"] for s in states].count(port) == 1


def test_metrics_show_a_request_within_seconds(make_run):
    url = make_run["url"]
    body = {"prompt": "hello", "max_tokens": 2}
    assert httpx.post(url + "/v1/completions", json=body, timeout=120).status_code == 200
    sent = time.monotonic()
    seen = None
    while time.monotonic() - sent < 5:  # Ray's default report interval would be 10 s
        text = httpx.get(url + "/metrics", timeout=30).text
        seen = [line for line in text.splitlines() if line.startswith("moeserve_requests_total")]
        if any('code="200"' in line for line in seen):
            return
        time.sleep(0.25)
    raise AssertionError(f"no request on /metrics 5 s after it finished: {seen}")


def test_plain_candidate_deploys_then_status_and_abort(make_run, tmp_path):
    cfg = candidate(tmp_path, make_run, "v2")
    start = moeserve(make_run, "rollout", "start", cfg, *README_START)
    assert start.returncode == 0, start.stdout + start.stderr
    assert "canary step 1/4 (5%)" in start.stdout
    status = moeserve(make_run, "rollout", "status", "--json")
    state = json.loads(status.stdout)["state"]
    assert state["candidate"]["name"] == "v2" and dict(state["weights"])["v2"] == 5
    abort = moeserve(make_run, "rollout", "abort")
    assert abort.returncode == 0 and "phase rolled_back" in abort.stdout, abort.stderr


def test_candidate_no_node_can_host_fails_with_one_line(make_run, tmp_path):
    cfg = candidate(tmp_path, make_run, "v3", "router: {num_cpus: 64}\n")
    t0 = time.monotonic()
    start = moeserve(make_run, "rollout", "start", cfg, *README_START)
    assert start.returncode == 1
    errors = [line for line in start.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, start.stderr
    assert errors[0].startswith('error: deploying v3 failed: its router replicas need {"CPU": 64')
    assert "router.num_cpus" in errors[0]
    assert time.monotonic() - t0 < 240  # Serve reports the pending replica after 30 s
    status = json.loads(moeserve(make_run, "rollout", "status", "--json").stdout)
    assert status["deploying"] is None and "v3" not in status["apps"]


def test_abort_stops_a_deploy_that_is_pending(make_run, tmp_path):
    cfg = candidate(tmp_path, make_run, "v4", "router: {num_cpus: 64}\n")
    start = subprocess.Popen(
        [*make_run["cli"], "rollout", "start", cfg, *README_START],
        env=make_run["env"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            status = json.loads(moeserve(make_run, "rollout", "status", "--json").stdout)
            if status["deploying"] == "v4":
                break
            assert time.monotonic() < deadline and start.poll() is None, status
            time.sleep(0.5)
        abort = moeserve(make_run, "rollout", "abort", timeout=60)
        assert abort.returncode == 0, abort.stdout + abort.stderr
        assert "cancelled: the deploy of v4" in abort.stdout
        _, err = start.communicate(timeout=60)
        assert start.returncode == 1 and "aborted by the operator" in err, err
    finally:
        if start.poll() is None:
            start.kill()
