"""What `make run` (moeserve serve --ray --background) checks and prints about the shared
prefix cache: a missing redis-server stops it with one line, and the line it prints says
where the cache is (embedded / a URL without its password / not connected and why / off)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from serve_app.config import REDIS_URL_ENV
from serve_app.kvstore.stats import describe_store
from serve_app.tools.ray_server import shared_cache_preflight


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
