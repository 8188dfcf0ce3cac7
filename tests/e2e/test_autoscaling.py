"""The router deployment scaled by autoscaling.policy on a real local Ray Serve.

One application (`scaled`, route prefix /scaled) with the LLM-signal policy, a short look-back
and short delays, `min_replicas: 0`, `max_replicas: 2`. A load ramp of streaming requests
(a batch of 2 sequences, the rest wait) makes the policy scale 1 -> 2; every request succeeds
while replicas start; when the load stops the policy steps down to 1, then to 0, and the next
request waits for a cold start instead of failing.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx
import openai
import pytest

from tests.conftest import wait_healthy
from tests.e2e.conftest import RayServe

pytestmark = pytest.mark.slow

APP = "scaled"
PREFIX = "/scaled"
DOWNSCALE_DELAY_S = 3.0


def _autoscaling() -> dict:
    return {
        "min_replicas": 0,
        "max_replicas": 2,
        # Fast signals: each replica records every 0.4 s and pushes every 0.5 s.
        "look_back_period_s": 2.0,
        "metrics_interval_s": 0.5,
        "target_running_per_replica": 2,  # = max_num_seqs below: the queue sizes the step
        "max_waiting_per_replica": 1,
        "ttft_slo_ms": 600_000,  # the queue, not the (CPU-noisy) TTFT, drives this test
        "upscale_cooldown_s": 1.0,
        "downscale_delay_s": DOWNSCALE_DELAY_S,
    }


@pytest.fixture(scope="module")
def scaled(ray_serve: RayServe) -> str:
    from ray import serve

    from serve_app.builder import build_app
    from tests.conftest import tiny_model_dir

    app = build_app(
        {
            "model": str(tiny_model_dir("qwen3_moe")),
            "served_model_name": "tiny",
            "expert_parallel_size": 0,
            "engine": {"num_kv_blocks": 128, "max_model_len": 512, "max_num_seqs": 2},
            "prefix_cache": {"enabled": False},
            # Small CPU reservations so 2 replicas fit next to the other e2e app on 2 cores.
            "router": {"num_cpus": 0.1, "num_threads": 1, "autoscaling": _autoscaling()},
        }
    )
    serve.run(app, name=APP, route_prefix=PREFIX, blocking=False)
    url = f"{ray_serve.url}{PREFIX}"
    # /v1/models answers from the ingress alone: polling it does not keep a router awake.
    wait_healthy(url, path="/v1/models")
    yield url
    serve.delete(APP)


def _router_replicas() -> Counter:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None or "router" not in app.deployments:
        return Counter()
    return Counter({str(k): v for k, v in app.deployments["router"].replica_states.items()})


def _wait_replicas(pred, timeout: float, what: str) -> Counter:
    deadline = time.monotonic() + timeout
    while True:
        states = _router_replicas()
        if pred(states):
            return states
        assert time.monotonic() < deadline, f"router never {what}: {dict(states)}"
        time.sleep(0.25)


def _running(states: Counter) -> int:
    return states.get("RUNNING", 0)


def _total(states: Counter) -> int:
    return sum(states.values())


async def _stream(client: openai.AsyncOpenAI, i: int, max_tokens: int) -> int:
    stream = await client.completions.create(
        model="tiny",
        prompt=f"load ramp request {i}",
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    usage = None
    async for chunk in stream:
        usage = chunk.usage or usage
    return usage.completion_tokens


def test_load_ramp_scales_routers_up_to_two_and_back_down(scaled):
    _wait_replicas(lambda s: _running(s) >= 1, 120, "started")  # the ingress' info() call
    max_tokens = 120
    results: list[int | BaseException] = []
    seen: list[Counter] = []

    async def ramp() -> None:
        client = openai.AsyncOpenAI(base_url=f"{scaled}/v1", api_key="unused", max_retries=0)
        stop = asyncio.Event()

        async def worker(w: int) -> None:
            i = 0
            while not stop.is_set():
                try:
                    results.append(await _stream(client, w * 1000 + i, max_tokens))
                except Exception as e:  # noqa: BLE001 - every outcome is asserted below
                    results.append(e)
                i += 1

        async def watch() -> None:
            # Ramp: 2 streams, then 8 (2 run, 6 queue on one replica). Keep the load on until
            # the second replica runs and has served a while, so requests hit it mid-scaling.
            deadline = time.monotonic() + 150
            both_since = None
            while time.monotonic() < deadline:
                states = await asyncio.to_thread(_router_replicas)
                seen.append(states)
                if _running(states) >= 2:
                    both_since = both_since or time.monotonic()
                    if time.monotonic() - both_since > 5:
                        break
                await asyncio.sleep(0.25)
            stop.set()

        workers = [asyncio.create_task(worker(w)) for w in range(2)]
        await asyncio.sleep(2)
        workers += [asyncio.create_task(worker(w)) for w in range(2, 8)]
        await watch()
        await asyncio.wait_for(asyncio.gather(*workers), timeout=180)

    asyncio.run(ramp())
    failures = [r for r in results if not isinstance(r, int) or r != max_tokens]
    assert not failures, f"{len(failures)} of {len(results)} requests failed: {failures[:3]}"
    assert max(_running(s) for s in seen) >= 2, f"never 2 running routers: {seen[-5:]}"

    # Load stopped: the policy steps down one replica per DOWNSCALE_DELAY_S of low load.
    one = _wait_replicas(lambda s: _running(s) == 1 and _total(s) == 1, 90, "came back to 1")
    assert one["RUNNING"] == 1


def test_idle_router_scales_to_zero_and_a_request_waits_for_the_cold_start(scaled):
    _wait_replicas(lambda s: _total(s) == 0, 90, "scaled to zero")
    t0 = time.monotonic()
    r = httpx.post(
        f"{scaled}/v1/completions",
        json={"model": "tiny", "prompt": "wake up", "max_tokens": 5, "ignore_eos": True},
        timeout=180,
    )
    cold_s = time.monotonic() - t0
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 5
    assert _running(_router_replicas()) == 1
    print(f"first request after scale to zero: {cold_s:.1f} s (cold start included)")
