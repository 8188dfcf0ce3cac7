"""One real local Ray cluster + Serve app for the end-to-end tests (session scope).

Ray is started by the fixture (ray.init) and shut down by it: only what the test started.
"""

from __future__ import annotations

import time

import pytest


@pytest.fixture(scope="session")
def serve_app_url(tmp_path_factory):
    import ray
    from ray import serve

    from serve_app.builder import build_app
    from tests.conftest import free_port, tiny_model_dir

    model = tiny_model_dir("qwen3_moe")
    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app(
        {
            "model": str(model),
            "served_model_name": "tiny",
            "engine": {"num_kv_blocks": 128, "max_model_len": 512},
            "router": {"num_replicas": 1, "num_cpus": 0},
        }
    )
    serve.run(app, name="moeserve", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        raise RuntimeError("Serve app did not become healthy")
    yield url, model
    serve.shutdown()
    ray.shutdown()
