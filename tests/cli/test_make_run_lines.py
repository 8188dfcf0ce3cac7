"""What `make run` (moeserve serve --ray --background) checks and prints about the shared
prefix cache: a missing redis-server stops it with one line, and the line it prints says
where the cache is (embedded / a URL without its password / not connected and why / off)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from serve_app.config import REDIS_URL_ENV
from serve_app.kvstore.stats import describe_store
from serve_app.tools.ray_server import shared_cache_preflight
from serve_app.tools.run_files import failure_cause
from tests.conftest import free_port, subprocess_env


def args(redis_url=None) -> argparse.Namespace:
    return argparse.Namespace(redis_url=redis_url)


def test_missing_redis_server_is_one_line_naming_both_fixes(monkeypatch):
    monkeypatch.delenv(REDIS_URL_ENV, raising=False)
    line = shared_cache_preflight(args(), which=lambda _: None)
    assert line is not None and "\n" not in line
    assert "redis-server" in line and "make install" in line and "REDIS_URL=" in line


@pytest.mark.parametrize(
    "redis_url, env, binary",
    [("redis://h:6379/0", None, None), (None, "redis://h:6379/0", None), (None, None, "/x")],
)
def test_a_url_or_the_binary_is_enough(monkeypatch, redis_url, env, binary):
    monkeypatch.delenv(REDIS_URL_ENV, raising=False)
    if env:
        monkeypatch.setenv(REDIS_URL_ENV, env)
    assert shared_cache_preflight(args(redis_url), which=lambda _: binary) is None


def store(**kw) -> dict:
    return {"connected": True, "url": None, "embedded": False, "last_error": None, **kw}


def test_describe_embedded_connected():
    line = describe_store(store(url="redis://127.0.0.1:40123/0", embedded=True), "-")
    assert line == "shared prefix cache: embedded redis-server at 127.0.0.1:40123 (connected)"


def test_describe_url_connected_shows_no_password():
    # the tier reports the URL already redacted; the line shows it as is
    line = describe_store(store(url="redis://:***@cache:6379/0"), "-")
    assert line == "shared prefix cache: redis://:***@cache:6379/0 (connected)"


def test_describe_down_at_start_says_why():
    s = store(connected=False, url="redis://cache:6379/0", last_error="start: ConnectionError: x")
    line = describe_store(s, "-")
    assert line.startswith("shared prefix cache: NOT connected (redis://cache:6379/0; start:")
    assert "serving from local compute" in line


def test_describe_off():
    assert describe_store(None, "single process") == "shared prefix cache: off (single process)"


def test_make_run_stops_with_that_line_before_starting_anything(tmp_path, qwen3_tiny):
    env = {k: v for k, v in os.environ.items() if k != REDIS_URL_ENV}
    env.update(PATH=str(tmp_path), MOESERVE_RUN_DIR=str(tmp_path / "run"))  # no redis-server
    out = subprocess.run(
        [sys.executable, "-m", "serve_app.cli", "serve", "--model", str(qwen3_tiny)]
        + ["--ray", "--background"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [shared_cache_preflight(args(), lambda _: None)]
    assert not (tmp_path / "run" / "server.pid").exists()


# ---- a background start that fails says why in one line ------------------------------------

TRACEBACK = """\
2026-12-07 12:52:06,430	INFO worker.py:2038 -- Started a local Ray instance.
Traceback (most recent call last):
  File "serve_app/tools/ray_server.py", line 190, in run_ray_server
    serve.run(build_app(config), name="moeserve", route_prefix="/", blocking=False)
ray.serve.exceptions.RayServeException: Deploying app 'moeserve' failed: port 18451 in use
2026-12-07 12:52:09,000	INFO worker.py:2100 -- Ray shut down
"""


@pytest.mark.parametrize(
    "log, cause",
    [
        (
            TRACEBACK,
            "ray.serve.exceptions.RayServeException: Deploying app 'moeserve' failed: "
            "port 18451 in use",
        ),
        (
            "starting\nerror: invalid app config: engine.block_size: must be > 0\n",
            "invalid app config: engine.block_size: must be > 0",
        ),
        ("Traceback (most recent call last):\n  x\nKeyboardInterrupt\n", "KeyboardInterrupt"),
        ("just a last line\n", "just a last line"),
        ("", None),
    ],
)
def test_failure_cause_is_the_logs_error_line(log, cause):
    assert failure_cause(log) == cause


def test_a_long_cause_is_cut_to_one_short_line():
    cause = failure_cause("RuntimeError: " + "x" * 1000)
    assert len(cause) == 300 and cause.endswith("...")


def test_background_start_that_fails_prints_its_cause(tmp_path):
    """The real path: the server process dies (no such model); the terminal gets one line with
    the exception from this start's lines of the log, not only "see .run/server.log"."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "server.log").write_text("RuntimeError: an earlier start's failure\n")
    env = subprocess_env(MOESERVE_RUN_DIR=str(run_dir))
    r = subprocess.run(
        [sys.executable, "-m", "serve_app.cli", "serve", "--model", str(tmp_path / "none")]
        + ["--port", "9", "--background"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("server exited with 1: OSError: ") and str(tmp_path / "none") in line
    assert "earlier start" not in line and line.endswith(f"(full log: {run_dir / 'server.log'})")


def test_a_background_start_with_an_api_key_comes_up_and_prints_a_curl_that_sends_it(
    tmp_path, qwen3_tiny
):
    """With MOESERVE_API_KEY set, /v1 wants the key: the readiness poll sends it (it waited
    600 s on 401s before), and the printed curl sends "$MOESERVE_API_KEY", never the key."""
    env = subprocess_env(MOESERVE_RUN_DIR=str(tmp_path), MOESERVE_API_KEY="k-secret")
    cli = [sys.executable, "-m", "serve_app.cli"]
    up = subprocess.run(
        [*cli, "serve", "--model", str(qwen3_tiny), "--port", str(free_port()), "--background"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    try:
        assert up.returncode == 0, up.stderr + (tmp_path / "server.log").read_text()
        assert "k-secret" not in up.stdout
        curl = next(line for line in up.stdout.splitlines() if "curl " in line).strip()
        assert '-H "Authorization: Bearer $MOESERVE_API_KEY"' in curl
        out = subprocess.run(["bash", "-c", curl], env=env, capture_output=True, text=True)
        assert json.loads(out.stdout)["usage"]["completion_tokens"] >= 1, out.stdout
    finally:
        subprocess.run([*cli, "stop"], env=env, capture_output=True, text=True, timeout=120)
