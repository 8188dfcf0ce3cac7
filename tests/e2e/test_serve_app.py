"""The Serve application (ingress -> router replica) on a real local Ray, via the openai SDK."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from serve_app.engine.llm import LLM
from serve_app.engine.request import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = ["The river bends", "Once upon a time there was", "café 東京 🙂", "1, 2, 3,"]


def test_greedy_outputs_match_in_process_engine(serve_app_url):
    url, model = serve_app_url
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    local = LLM(str(model), num_kv_blocks=128, max_model_len=512)
    ref = local.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for prompt, r in zip(PROMPTS, ref, strict=True):
        got = client.completions.create(
            model="tiny",
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert got.choices[0].text == r.choices[0].text


def test_chat_and_concurrent_streams(serve_app_url):
    url, _ = serve_app_url

    async def one(client: openai.AsyncOpenAI, i: int) -> int:
        stream = await client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": f"hello {i}"}],
            max_completion_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
        return usage.completion_tokens

    async def run() -> list[int]:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        return await asyncio.gather(*(one(client, i) for i in range(16)))

    assert asyncio.run(run()) == [8] * 16


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"prompt": "", "max_tokens": 4}, 400, "prompt"),
        ({"prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
        ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
        ({"prompt": "hi", "model": "nope"}, 404, "model"),
    ],
)
def test_bad_requests_get_4xx(serve_app_url, body, status, param):
    url, _ = serve_app_url
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
    assert r.status_code == status and r.json()["error"]["param"] == param
    health = httpx.get(f"{url}/health", timeout=10).json()
    assert health["status"] == "ok"
