"""Adapter rollouts end to end on a real local Ray Serve: an app ("adapters") serving adapter
`sql` from its config; `moeserve rollout start --adapter` puts a second directory behind the
name (the controller actor loads it on the router, the ingress polls the split), requests are
split sticky per session, and a candidate with an injected regression is rolled back by the
controller's own analysis loop with no failed request. The base app is never redeployed."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from tests.conftest import wait_healthy, wait_until

APP = "adapters"
PIN = "x-moeserve-adapter-version"
FAST = {"interval_s": 1.0, "window_s": 30.0, "min_samples": 4, "max_ttft_p99_ms": None}


@pytest.fixture(scope="module")
def app(ray_serve, tmp_path_factory):
    import ray
    from ray import serve

    from serve_app.builder import build_app
    from serve_app.deployments.rollout_actor import get_controller
    from tests.conftest import tiny_model_dir
    from tests.lora.test_peft_format import make_peft_adapter

    model = tiny_model_dir("qwen3_moe", 0)
    root = tmp_path_factory.mktemp("adapters")
    dirs = {
        v: str(make_peft_adapter(model, root / v, seed=s, target_modules=["q_proj", "v_proj"]))
        for v, s in (("v1", 1), ("v2", 2))
    }
    config = {
        "model": str(model),
        "version": "base",
        "served_model_name": "tiny",
        "engine": {"num_kv_blocks": 128, "max_model_len": 256},
        "prefix_cache": {"enabled": False},
        "router": {"num_replicas": 1, "num_cpus": 0},
        "lora": {"adapters": {"sql": dirs["v1"]}, "max_lora_rank": 16},
    }
    serve.run(build_app(config), name=APP, route_prefix=f"/{APP}")
    url = f"{ray_serve.url}/{APP}"
    wait_healthy(url, 120)
    controller = get_controller(APP)
    yield {
        "url": url,
        "controller": controller,
        "address": ray.get_runtime_context().gcs_address,
        "dirs": dirs,
    }
    serve.delete(APP)
    ray.kill(controller, no_restart=True)


def complete(client: httpx.Client, url: str, user: str, pin: str | None = None) -> str:
    body = {"model": "sql", "prompt": "hello", "max_tokens": 2, "temperature": 0, "user": user}
    r = client.post(f"{url}/v1/completions", json=body, headers={PIN: pin} if pin else {})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def status(app) -> dict:
    import ray

    return ray.get(app["controller"].status.remote(adapter="sql"))


def test_adapter_canary_by_cli_then_an_injected_regression_rolls_back(app):
    import ray

    url, ctl = app["url"], app["controller"]
    cmd = [sys.executable, "-m", "serve_app.cli", "rollout", "start", "--adapter", "sql"]
    cmd += [app["dirs"]["v2"], "--version", "v2", "--steps", "10,100", "--interval", "1h"]
    cmd += ["--app", APP, "--address", app["address"]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "adapter sql | phase progressing | canary step 1/2 (10%)" in done.stdout
    with httpx.Client(timeout=60) as client:
        # the ingress polls the split every 0.5 s: then an unknown version pin is a 400
        body = {"model": "sql", "prompt": "hello", "max_tokens": 1}
        wait_until(
            lambda: client.post(f"{url}/v1/completions", json=body, headers={PIN: "v9"})
            .status_code == 400,
            30,
        )  # fmt: skip
        texts = {v: complete(client, url, "p", pin=v) for v in ("v1", "v2")}
        assert texts["v1"] != texts["v2"]
        users = [f"user-{i}" for i in range(24)]
        first = {u: complete(client, url, u) for u in users}
        assert all(complete(client, url, u) == first[u] for u in users)  # sticky
        assert set(first.values()) == set(texts.values())  # both versions serve the name
        wait_until(lambda: status(app)["metrics"]["v2"]["requests"] > 1, 30)
        assert ray.get(ctl.abort.remote(adapter="sql"))["state"]["phase"] == "rolled_back"

        bad = {"model": app["dirs"]["v2"], "fault_injection": {"error_rate": 1.0}}
        strategy = {"kind": "canary", "steps": [50, 100], "interval_s": 3600.0, "auto": True}
        s = ray.get(ctl.start_adapter.remote("sql", "v3", bad, strategy, FAST))
        assert s["state"]["phase"] == "progressing", s
        served = set()

        def rolled_back() -> bool:
            # requests keep coming: the analysis needs the candidate's outcomes; every one of
            # them must succeed (a failed v3 attempt is retried on v1)
            served.update(complete(client, url, u) for u in users[:8])
            return status(app)["state"]["phase"] != "progressing"

        wait_until(rolled_back, 90)
    s = status(app)
    assert s["state"]["phase"] == "failed" and "error rate" in s["state"]["reason"], s
    assert s["state"]["weights"] == [["v1", 100]] and s["rollbacks"]["error_rate"] == 1
    assert served == {texts["v1"]}
