"""DeepSeek-V3 served by the Ray Serve app: ingress -> router replica (MLA over the latent
cache, the fp32 gate, shared experts) -> 2 expert shard actors (routed experts), with the
embedded Redis prefix tier on. Greedy output over HTTP (openai SDK, streamed and not) equals
the in-process engine, which tests/model matches against transformers."""

from __future__ import annotations

import httpx
import openai
import pytest

from serve_app.engine.request import SamplingParams
from serve_app.runtime.llm import LLM
from tests.conftest import tiny_model_dir, wait_healthy
from tests.e2e.conftest import RayServe

pytestmark = pytest.mark.slow

APP = "deepseek"
PREFIX = "/deepseek"
PROMPTS = ["The river bends", "Once upon a time there was", "café 東京 🙂", "1, 2, 3,"]


@pytest.fixture(scope="module")
def deepseek_url(ray_serve: RayServe):
    from ray import serve

    from serve_app.builder import build_app

    model = tiny_model_dir("deepseek_v3")
    app = build_app(
        {
            "model": str(model),
            "served_model_name": "ds",
            "expert_parallel_size": 2,
            "engine": {"num_kv_blocks": 256, "max_model_len": 1024},
            "router": {"num_replicas": 1, "num_cpus": 0},
            "experts": {"num_cpus": 0, "call_timeout_s": 60},
        }
    )
    serve.run(app, name=APP, route_prefix=PREFIX, blocking=False)
    url = f"{ray_serve.url}{PREFIX}"
    wait_healthy(url, timeout_s=180)
    yield url, model
    serve.delete(APP)


def test_deepseek_over_http_with_two_expert_actors_matches_in_process(deepseek_url):
    url, model = deepseek_url
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    local = LLM(str(model), num_kv_blocks=128, max_model_len=512)
    ref = local.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for prompt, r in zip(PROMPTS, ref, strict=True):
        kwargs = dict(model="ds", prompt=prompt, max_tokens=12, temperature=0)
        got = client.completions.create(**kwargs, extra_body={"ignore_eos": True})
        assert got.choices[0].text == r.choices[0].text
        streamed = client.completions.create(**kwargs, stream=True, extra_body={"ignore_eos": True})
        assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text
    health = httpx.get(f"{url}/health", timeout=10).json()
    assert health["kv_cache"]["format"].startswith("mla:1x1x64:48+16")
    assert health["prefix_cache"]["store"]["connected"]
