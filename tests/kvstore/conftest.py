"""A real redis-server per test module, started on a free port and stopped by its PID.

NOTE: a missing redis-server fails these tests, it never skips them: a green run must have
touched Redis. `make install` (so `make test`) installs it; see the Makefile's `redis` target.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest
import redis

from tests.conftest import free_port

MISSING = (
    "redis-server is not installed, and the shared prefix cache tests need a real one: run "
    "`make install` as root or with passwordless sudo, or `apt-get install redis-server`"
)


@pytest.fixture(scope="session", autouse=True)
def redis_server_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        pytest.fail(MISSING, pytrace=False)
    return path


class RedisProc:
    """One redis-server on a fixed port that a test can kill and start again."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProc:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
            + ["--appendonly", "no", "--maxmemory", "256mb", "--maxmemory-policy", "allkeys-lru"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.client().ping():
                    return self
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL by PID: the abrupt death of a cache server."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)


@pytest.fixture(scope="module")
def redis_server():
    server = RedisProc().start()
    yield server
    server.stop()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model gains nothing from 2 OpenMP threads, and on a shared 2-core machine
    their spin-waits make each step 50x slower; one thread keeps this suite fast."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
