"""One real local Ray cluster + Serve for the end-to-end tests (session scope), and the app.

`serve_app` runs with expert_parallel_size 2: two expert shard actors, shared by the router.
Other modules deploy their own application on the same Ray and Serve (`ray_serve`), under
another name and route prefix, and delete it when done.
Ray is started by the fixture (ray.init) and shut down by it: only what the test started.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

EXPERT_PARALLEL_SIZE = 2


@dataclass(frozen=True)
class ServeApp:
    url: str
    model: Path


@dataclass(frozen=True)
class RayServe:
    url: str  # the Serve HTTP proxy; each app has its own route prefix


@pytest.fixture(scope="session")
def ray_serve() -> RayServe:
    """One local Ray + Serve for every e2e test module; each deploys its own application."""
    import ray
    from ray import serve

    from tests.conftest import free_port

    port = free_port()
    # A killed expert shard is noticed at the controller's next health check of it; poll
    # every second (default 10 s) so the recovery test stays short. Read at Ray start-up.
    os.environ["RAY_SERVE_DEPLOYMENT_ACTOR_HEALTH_CHECK_PERIOD_S"] = "1"
    # Processes send their metrics to the node agent every second (default 10 s), so the
    # metrics tests see a request on /metrics within a few seconds. Read at Ray start-up.
    os.environ["RAY_metrics_report_interval_ms"] = "1000"
    # Serve's standard mode (its proxy actor) for this shared Ray. NOTE: `make run`'s
    # throughput mode (HAProxy, direct ingress) is what test_make_run and test_readme_path
    # start; two throughput-mode Rays on one machine once interfered (a second one's ingress
    # had no rollout controller; both apps' fallback proxies then shared port 8500, since given
    # free ports: docs/serving-path.md), so this one stays standard. Read at start-up.
    from serve_app.tools.ray_server import serve_mode_env

    mode = serve_mode_env("standard")
    saved = {k: os.environ.get(k) for k in mode}
    os.environ.update(mode)
    try:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield RayServe(f"http://127.0.0.1:{port}")
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def qv_adapter(tmp_path_factory) -> Path:
    """A q/v LoRA adapter of the tiny Qwen3-MoE, served by `serve_app` as model `qv`."""
    from tests.conftest import tiny_model_dir
    from tests.lora.test_peft_format import make_peft_adapter

    out = tmp_path_factory.mktemp("lora") / "qv"
    return make_peft_adapter(
        tiny_model_dir("qwen3_moe"), out, seed=1, target_modules=["q_proj", "v_proj"]
    )


@pytest.fixture(scope="session")
def expert_adapters(tmp_path_factory) -> dict[str, Path]:
    """Expert LoRA adapters of the tiny Qwen3-MoE, served by `serve_app` over its 2 expert
    shard actors: `xall` on every linear incl. the routed experts (PEFT's all-linear: 3-D
    factors) and `x3d` on q_proj and the 3-D expert `target_parameters`."""
    from tests.conftest import tiny_model_dir
    from tests.lora.peft_cases import CASES
    from tests.lora.test_peft_format import make_peft_adapter

    root = tmp_path_factory.mktemp("lora-experts")
    kinds = {"xall": "all", "x3d": "experts3d"}
    return {
        name: make_peft_adapter(
            tiny_model_dir("qwen3_moe"), root / name, seed=i + 1, **CASES["qwen3_moe"][kind]
        )
        for i, (name, kind) in enumerate(kinds.items())
    }


@pytest.fixture(scope="session")
def serve_app(ray_serve: RayServe, qv_adapter: Path, expert_adapters: dict[str, Path]) -> ServeApp:
    from ray import serve

    from serve_app.builder import build_app
    from tests.conftest import tiny_model_dir, wait_healthy

    model = tiny_model_dir("qwen3_moe")
    app = build_app(
        {
            "model": str(model),
            "served_model_name": "tiny",
            "expert_parallel_size": EXPERT_PARALLEL_SIZE,
            "engine": {"num_kv_blocks": 256, "max_model_len": 1024},
            "router": {"num_replicas": 1, "num_cpus": 0},
            "experts": {"num_cpus": 0, "call_timeout_s": 60},
            "lora": {
                "adapters": {"qv": str(qv_adapter)}
                | {name: str(path) for name, path in expert_adapters.items()}
            },
        }
    )
    serve.run(app, name="moeserve", route_prefix="/", blocking=False)
    wait_healthy(ray_serve.url, timeout_s=180)
    yield ServeApp(ray_serve.url, model)
    serve.delete("moeserve")
