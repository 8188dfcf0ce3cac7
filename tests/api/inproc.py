"""Serving an app in-process for the API tests: uvicorn on a free port, in a thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from serve_app.engine.async_engine import AsyncLLMEngine
from tests.conftest import free_port


@contextmanager
def serving(app) -> Iterator[str]:
    """Yields the base URL while uvicorn serves `app`."""
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


def wait_idle(engine: AsyncLLMEngine, timeout_s: float = 10.0) -> None:
    """Until no request runs and no KV block is held (else fail: a leak)."""
    for _ in range(int(timeout_s / 0.05)):
        s = engine.stats()
        if s.kv_blocks_used == 0 and s.num_running == 0 and engine.num_in_flight == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"engine not idle: {engine.stats()}")
