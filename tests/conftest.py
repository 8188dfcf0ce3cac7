"""Shared fixtures: tiny test checkpoints, built once and reused (models/test/ by default)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from serve_app.procs import free_port  # noqa: F401 - re-exported for the tests

ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral", "llama", "deepseek_v3", "deepseek_v2")
REPO = Path(__file__).resolve().parent.parent


def tiny_model_dir(arch: str, seed: int = 0) -> Path:
    """Build (once) and return the tiny checkpoint of `arch`. `make test-models` prebuilds them."""
    from serve_app.tools.make_model import make_model

    root = Path(os.environ.get("MOESERVE_TEST_MODELS", REPO / "models" / "test"))
    out = root / f"{arch}-tiny-s{seed}"
    if not (out / "config.json").exists():
        make_model(arch, "tiny", out, seed)
    return out


@pytest.fixture(scope="session", params=ARCHS)
def tiny_model(request) -> Path:
    return tiny_model_dir(request.param)


@pytest.fixture(scope="session")
def qwen3_tiny() -> Path:
    return tiny_model_dir("qwen3_moe")


def wait_until(
    check,
    timeout_s: float = 60.0,
    every: float = 0.25,
    what: str = "condition",
    ignore: tuple[type[BaseException], ...] = (),
):
    """Call `check` until it returns something truthy (returned); exceptions in `ignore` count
    as not yet. Fails the test after timeout_s."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if got := check():
                return got
        except ignore:
            pass
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}"
        time.sleep(every)


def wait_healthy(url: str, timeout_s: float = 180, path: str = "/health") -> None:
    """Poll `url``path` until it answers 200; fail if it does not within timeout_s."""
    import httpx

    wait_until(
        lambda: httpx.get(f"{url}{path}", timeout=10).status_code == 200,
        timeout_s,
        every=0.5,
        what=f"{url}{path} to answer 200",
        ignore=(httpx.HTTPError,),
    )


# What ray.init() exports into its driver's environment (Ray 2.60). A `moeserve` process that
# a test starts must not inherit it: it would take the test session's Ray auth mode for its own
# cluster and the CLI's (the README path fails only when another e2e module started Ray first).
DRIVER_ENV = ("RAY_AUTH_MODE", "RAY_CLIENT_MODE", "PYTHONBREAKPOINT")


def subprocess_env(**extra: str) -> dict[str, str]:
    """os.environ as a new user's shell has it (no Ray driver state), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in DRIVER_ENV}
    return env | extra


# The session's exit status, kept for pytest_unconfigure below.
_EXIT_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """End a session that started Ray in this process with os._exit(status), after every report.

    ray.shutdown() leaves native threads running in the driver (Ray 2.60: `gcs_client_io_s`,
    gRPC's `event_engine`, `grpc_global_tim`, `resolver-execut`; /proc/self/task after
    init + shutdown). At interpreter exit the C++ static destructors then run beside them, and
    once in a while the process dies of SIGSEGV after pytest has printed its summary: CI once
    failed so with "901 passed" (no Python frame left for the faulthandler to print). Skipping
    that teardown keeps the status pytest computed; nothing of ours runs at exit (every fixture
    has been finalised by now, and a test stops what it started by PID)."""
    status = config.stash.get(_EXIT_STATUS, None)
    if status is None or "ray._raylet" not in sys.modules:
        return
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if stream is not None:
            stream.flush()
    os._exit(status)
