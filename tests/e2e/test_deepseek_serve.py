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
def ds_adapter(tmp_path_factory):
    """A PEFT all-linear adapter of the tiny DeepSeek-V3: MLA's projections incl. kv_b_proj,
    the dense and shared-expert MLPs, the routed experts (3-D factors)."""
    pytest.importorskip("peft")
    from tests.lora.test_peft_format import make_peft_adapter

    out = tmp_path_factory.mktemp("ds-lora") / "all"
    model = tiny_model_dir("deepseek_v3")
    return make_peft_adapter(model, out, seed=7, target_modules="all-linear")


@pytest.fixture(scope="module")
def deepseek_url(ray_serve: RayServe, ds_adapter):
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
            "lora": {"adapters": {"all": str(ds_adapter)}},
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


def test_a_deepseek_adapter_over_http_with_two_expert_actors_matches_in_process(
    deepseek_url, ds_adapter
):
    """An all-linear adapter (kv_b_proj in both MLA forms, routed-expert slices on the 2 shard
    actors): greedy text equal to the in-process engine's with it (which tests/lora matches
    against transformers + PEFT's merged model), and not the base model's."""
    url, model = deepseek_url
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    local = LLM(str(model), num_kv_blocks=128, max_model_len=512,
                lora_adapters=(("all", str(ds_adapter)),))  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want = [r.choices[0].text for r in local.generate(PROMPTS[:2], params, lora="all")]
    base = [r.choices[0].text for r in local.generate(PROMPTS[:2], params)]
    assert want != base
    for prompt, text in zip(PROMPTS[:2], want, strict=True):
        got = client.completions.create(
            model="all",
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert got.choices[0].text == text  # fmt: skip
