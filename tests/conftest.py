"""Shared fixtures: tiny test checkpoints, built once and reused (models/test/ by default)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from serve_app.procs import free_port  # noqa: F401 - re-exported for the tests

ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral", "llama")
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


def wait_healthy(url: str, timeout_s: float = 180, path: str = "/health") -> None:
    """Poll `url``path` until it answers 200; raise if it does not within timeout_s."""
    import time

    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}{path}", timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"Serve app at {url} did not become healthy in {timeout_s:.0f} s")
