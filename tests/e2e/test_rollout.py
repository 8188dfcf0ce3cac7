"""Rollouts end to end on a real local Ray Serve: an app ("rollout", base version v1) on the
session's Ray, candidates deployed by the rollout controller, load running through
every phase. The tests run in file order and share the app's rollout history (v1 -> v2 -> ...).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import wait_healthy, wait_until

APP = "rollout"
PIN = "x-moeserve-version"
FAST_ANALYSIS = {
    "interval_s": 1.0,
    "window_s": 5.0,
    "min_samples": 3,
    "max_ttft_p99_ms": 60000.0,  # a slow shared CI machine must not fail a good candidate
    "scale_down_delay_s": 60.0,
}


def app_config(model: Path, version: str, **extra) -> dict:
    return {
        "model": str(model),
        "version": version,
        "served_model_name": "tiny",
        "engine": {"num_kv_blocks": 128, "max_model_len": 256},
        "prefix_cache": {"enabled": False},
        "router": {"num_replicas": 1, "num_cpus": 0},
        "rollout": {"analysis": FAST_ANALYSIS},
        **extra,
    }


class Load:
    """Sessions sending small completions in a loop; records what each request got."""

    def __init__(self, url: str, sessions: int = 16):
        self.url, self.sessions = url, sessions
        self.seen: dict[str, list[str]] = defaultdict(list)
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(2)]

    def _run(self, worker: int) -> None:
        with httpx.Client(timeout=60) as client:
            i = worker
            while not self.stop.is_set():
                user = f"user-{i % self.sessions}"
                body = {"model": "tiny", "prompt": "hello", "max_tokens": 3, "user": user}
                try:
                    r = client.post(f"{self.url}/v1/completions", json=body)
                    if r.status_code != 200:
                        self.failures.append(f"{r.status_code} {r.text[:200]}")
                    else:
                        self.seen[user].append(r.headers[PIN])
                except httpx.HTTPError as e:
                    self.failures.append(repr(e))
                i += 2

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)

    def served(self) -> set[str]:
        return {v for vs in self.seen.values() for v in vs}


@pytest.fixture(scope="module")
def rollout(ray_serve, tmp_path_factory):
    import ray
    from ray import serve

    from serve_app.builder import build_app
    from serve_app.deployments.rollout_actor import get_controller
    from tests.conftest import tiny_model_dir

    base = app_config(tiny_model_dir("qwen3_moe", 0), "v1")
    serve.run(build_app(base), name=APP, route_prefix=f"/{APP}")
    url = f"{ray_serve.url}/{APP}"
    wait_healthy(url, 120)
    ctx = {
        "url": url,
        "controller": get_controller(APP),
        "address": ray.get_runtime_context().gcs_address,
        "dir": tmp_path_factory.mktemp("rollout"),
        "s0": tiny_model_dir("qwen3_moe", 0),
        "s1": tiny_model_dir("qwen3_moe", 1),
    }
    yield ctx
    for name in list(serve.status().applications):
        if name == APP or name.startswith(f"{APP}--"):
            serve.delete(name)
    ray.kill(ctx["controller"], no_restart=True)


def _wait(cond, timeout: float) -> None:
    wait_until(cond, timeout, ignore=(httpx.HTTPError,))


def status(ctx) -> dict:
    import ray

    return ray.get(ctx["controller"].status.remote())


def cli(ctx, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "serve_app.cli", "rollout", *args]
    cmd += ["--app", APP, "--address", ctx["address"]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def write_config(ctx, name: str, config: dict) -> str:
    path = ctx["dir"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_cli_errors_before_anything_is_deployed(rollout):
    done = cli(rollout, "promote", check=False)
    assert done.returncode == 1 and "no rollout in progress" in done.stderr
    bad = write_config(rollout, "bad", {**app_config(rollout["s1"], "v2"), "bogus": 1})
    done = cli(rollout, "start", bad, check=False)
    assert done.returncode == 1 and "bogus" in done.stderr
    done = cli(rollout, "undo", "--to", "v9", check=False)
    assert done.returncode == 1 and "unknown version 'v9'" in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "serve_app.cli", "rollout", "status", "--app", "nope"]
        + ["--address", rollout["address"]],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "no moeserve app 'nope'" in done.stderr
    r = httpx.post(
        f"{rollout['url']}/v1/completions",
        json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
        headers={PIN: "v9"},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == PIN
    assert status(rollout)["state"]["phase"] == "idle"


def test_good_canary_steps_up_and_is_promoted_with_sticky_sessions(rollout):
    config = write_config(rollout, "v2", app_config(rollout["s1"], "v2"))
    with Load(rollout["url"]) as load:
        cli(rollout, "start", config, "--steps", "25,50,100", "--interval", "2s")
        _wait(lambda: status(rollout)["state"]["phase"] != "progressing", 180)
        time.sleep(2)  # some traffic after the promotion
    s = status(rollout)
    assert s["state"]["phase"] == "promoted", s["state"]["reason"]
    assert s["state"]["stable"]["name"] == "v2"
    assert load.failures == []
    assert load.served() == {"v1", "v2"}
    for user, versions in load.seen.items():
        # Sticky: a session moves from v1 to v2 once, never back.
        first_v2 = versions.index("v2") if "v2" in versions else len(versions)
        assert set(versions[first_v2:]) <= {"v2"}, (user, versions)
        assert versions[-1] == "v2"
    out = cli(rollout, "status").stdout
    assert "promoted" in out and "v2" in out


def test_bad_canary_is_rolled_back_with_no_client_visible_failure(rollout):
    config = app_config(rollout["s0"], "v3", fault_injection={"error_rate": 1.0})
    config["rollout"] = {"steps": [50, 100], "interval_s": 600, "analysis": FAST_ANALYSIS}
    path = write_config(rollout, "v3", config)
    with Load(rollout["url"]) as load:
        time.sleep(1)
        cli(rollout, "start", path)
        _wait(lambda: status(rollout)["state"]["phase"] != "progressing", 120)
    s = status(rollout)
    assert s["state"]["phase"] == "failed"
    assert "error rate" in s["state"]["reason"]
    assert s["state"]["weights"] == [["v2", 100]]
    # Within two analysis intervals of starting: the loop is not aligned with the start, so
    # the first analysis may come right after it, and two intervals hold at most three.
    assert s["analyses"] <= 3
    assert s["rollbacks"] == {"error_rate": 1}
    assert load.failures == []  # every failed v3 attempt was retried on v2
    assert load.served() == {"v2"}


def test_blue_green_preview_switch_and_undo(rollout):
    path = write_config(rollout, "v4", app_config(rollout["s0"], "v4"))
    url = f"{rollout['url']}/v1/completions"
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    with Load(rollout["url"]) as load:
        cli(rollout, "start", path, "--strategy", "bluegreen", "--manual")
        preview = httpx.post(url, json=body, headers={PIN: "v4"}, timeout=60)
        assert preview.status_code == 200 and preview.headers[PIN] == "v4"
        time.sleep(2)
        assert load.served() == {"v2"}  # 0% until the switch
        cli(rollout, "promote")
        _wait(lambda: httpx.post(url, json=body, timeout=60).headers[PIN] == "v4", 30)
        s = status(rollout)["state"]
        assert s["stable"]["name"] == "v4" and s["weights"] == [["v4", 100], ["v2", 0]]
        cli(rollout, "undo")
        _wait(lambda: httpx.post(url, json=body, timeout=60).headers[PIN] == "v2", 30)
        time.sleep(1)
    assert status(rollout)["state"]["stable"]["name"] == "v2"
    assert load.failures == []
    assert load.served() == {"v2", "v4"}


def test_rollout_state_survives_killing_the_ingress_and_the_controller(rollout):
    import ray

    path = write_config(rollout, "v5", app_config(rollout["s1"], "v5"))
    cli(rollout, "start", path, "--steps", "50,100", "--interval", "600s")
    before = status(rollout)["state"]
    assert before["weights"] == [["v5", 50], ["v2", 50]]

    ingress = [
        a for a in ray.util.list_named_actors(all_namespaces=True) if f"{APP}#ingress" in a["name"]
    ]
    assert ingress
    for a in ingress:
        ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)
    ray.kill(rollout["controller"], no_restart=False)  # Ray restarts it; it reloads the state

    url = f"{rollout['url']}/v1/completions"
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    _wait(
        lambda: httpx.post(url, json=body, headers={PIN: "v5"}, timeout=30).status_code == 200, 120
    )
    after = status(rollout)["state"]
    assert after["weights"] == before["weights"] and after["phase"] == "progressing"
    versions = {
        httpx.post(url, json={**body, "user": f"u{i}"}, timeout=60).headers[PIN] for i in range(12)
    }
    assert versions == {"v2", "v5"}
    cli(rollout, "abort")
    assert status(rollout)["state"]["weights"] == [["v2", 100]]
