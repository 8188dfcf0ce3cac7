"""Expert rebalancing inside a running Serve app (ingress -> router -> 2 shards + balancer).

The balancer acts on any imbalance here (threshold 1.0, no minimum gain, a 2 s window), so the
tiny model's natural routing skew is enough to make it replicate experts while greedy requests
keep running: the placement generation goes up, the shards hold what it says, no request fails
and every output equals the in-process engine's.
"""

from __future__ import annotations

import asyncio
import time

import openai
import pytest

from serve_app.engine.request import SamplingParams
from serve_app.runtime.llm import LLM
from tests.conftest import wait_healthy
from tests.e2e.conftest import RayServe

pytestmark = pytest.mark.slow

APP = "rebalanced"
PREFIX = "/rebalanced"
PROMPTS = ["The river bends", "Once upon a time there was", "1, 2, 3,", "story number 7"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def rebalanced(ray_serve: RayServe):
    from ray import serve

    from serve_app.builder import build_app
    from tests.conftest import tiny_model_dir

    model = tiny_model_dir("qwen3_moe")
    rebalance = {
        "enabled": True,
        "interval_s": 0.5,
        "window_s": 2.0,
        "imbalance_threshold": 1.0,
        "min_gain": 0.0,
        "min_tokens": 1,
        "sync_interval_s": 0.2,
        "router_timeout_s": 5.0,
    }
    app = build_app(
        {
            "model": str(model),
            "served_model_name": "tiny",
            "expert_parallel_size": 2,
            "engine": {"num_kv_blocks": 256, "max_model_len": 512},
            "prefix_cache": {"enabled": False},
            "router": {"num_replicas": 1, "num_cpus": 0},
            "experts": {"num_cpus": 0, "call_timeout_s": 60, "rebalance": rebalance},
        }
    )
    serve.run(app, name=APP, route_prefix=PREFIX, blocking=False)
    url = f"{ray_serve.url}{PREFIX}"
    wait_healthy(url, timeout_s=180)
    yield url, model
    serve.delete(APP)


def _router():
    from ray import serve

    return serve.get_deployment_handle("router", app_name=APP)


def _expert_load() -> dict:
    return _router().expert_load.remote().result()


def _shards_owned() -> dict[str, list[int]]:
    """shard actor name -> experts it holds, for this app's shards (named by Serve)."""
    import ray

    out = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        if "experts-" in a["name"] and APP in a["name"]:
            h = ray.get_actor(a["name"], namespace=a["namespace"])
            out[a["name"]] = ray.get(h.info.remote(), timeout=60)["owned"]
    return out


def test_hot_experts_are_replicated_while_requests_run(rebalanced):
    url, model = rebalanced
    local = LLM(str(model), num_kv_blocks=128, max_model_len=512)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    reference = {
        p: r.choices[0].text for p, r in zip(PROMPTS, local.generate(PROMPTS, params), strict=True)
    }
    assert _expert_load()["generation"] == 0

    async def one(client: openai.AsyncOpenAI, prompt: str) -> None:
        got = await client.completions.create(
            model="tiny",
            prompt=prompt,
            max_tokens=MAX_TOKENS,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert got.choices[0].text == reference[prompt]  # a failure raises: none may fail

    async def run() -> tuple[int, int]:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        deadline = time.monotonic() + 240
        sent, load = 0, await _router().expert_load.remote()
        # Keep requests running until a rebalance has been published and its drop done.
        while load["generation"] < 1 or _owned_by_shard() != load["placement"]:
            assert time.monotonic() < deadline, f"no rebalance in time: {load}"
            await asyncio.gather(*(one(client, p) for p in PROMPTS))
            sent += len(PROMPTS)
            load = await _router().expert_load.remote()
        await asyncio.gather(*(one(client, p) for p in PROMPTS))  # and after the switch
        return sent + len(PROMPTS), load["generation"]

    sent, generation = asyncio.run(run())
    assert sent > 0 and generation >= 1
    placement = _expert_load()["placement"]
    assert any(sum(e in s for s in placement) == 2 for e in range(8))  # a replicated expert


def _owned_by_shard() -> list[list[int]]:
    owned = _shards_owned()
    return [owned[n] for n in sorted(owned, key=lambda n: n.rsplit("experts-", 1)[1])]
