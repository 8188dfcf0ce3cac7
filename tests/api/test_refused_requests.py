"""A refused request leaves nothing behind (in-process): a multi-prompt completion is checked
whole before any prompt is queued, and prompts already queued are aborted when a later one is
refused. Measured by the tokens the engine ran through its experts, not by time."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from serve_app.api.routes import create_app
from serve_app.api.submit import discard
from serve_app.engine.async_engine import AsyncLLMEngine
from serve_app.engine.config import EngineConfig
from serve_app.engine.request import SamplingParams
from serve_app.runtime.factory import build_async_engine
from serve_app.tools.local_client import LocalEngineClient
from tests.api import inproc

LONG = " ".join(["word"] * 6000)  # far past the context


@pytest.fixture(scope="module")
def engine(qwen3_tiny):
    engine = build_async_engine(
        EngineConfig(model=str(qwen3_tiny), num_kv_blocks=256, max_model_len=2048)
    )
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def client(engine):
    return LocalEngineClient(engine, "tiny")


async def submit_long(client: LocalEngineClient, rid: str):
    """A request that would run for 1500 tokens, through the in-process front end."""
    params = SamplingParams(max_tokens=1500, ignore_eos=True)
    return (await client.submit("hello there", params, rid)).stream


def tokens_computed(engine: AsyncLLMEngine) -> int:
    return sum(engine.stats().expert_tokens)


def wait_idle(engine: AsyncLLMEngine) -> None:
    inproc.wait_idle(engine, timeout_s=20.0)


async def post(engine: AsyncLLMEngine, body: dict) -> httpx.Response:
    app = create_app(LocalEngineClient(engine, "tiny"), api_keys=frozenset())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        return await c.post("/v1/completions", json=body)


@pytest.mark.parametrize("stream", [False, True])
async def test_too_long_second_prompt_submits_nothing(engine, stream):
    wait_idle(engine)
    before = tokens_computed(engine)
    body = {"prompt": ["hello there", LONG], "max_tokens": 2000, "ignore_eos": True}
    r = await post(engine, {**body, "stream": stream})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "prompt"
    wait_idle(engine)
    assert tokens_computed(engine) == before  # "hello there" never ran


@pytest.mark.parametrize("stream", [False, True])
async def test_prompt_refused_by_the_engine_aborts_those_submitted(engine, stream):
    """The API's check passes (lengths fit), the engine refuses the second prompt (a token id
    outside the vocabulary) after the first was queued: the first is aborted."""
    wait_idle(engine)
    before = tokens_computed(engine)
    vocab = engine.engine.spec.vocab_size
    body = {"prompt": [[1, 2, 3], [vocab + 7]], "max_tokens": 2000, "ignore_eos": True}
    r = await post(engine, {**body, "stream": stream})
    assert r.status_code == 400, r.text
    wait_idle(engine)
    spec = engine.engine.spec
    per_token = spec.num_layers * spec.top_k  # expert slots one token takes, all layers
    # the first prompt ran for a few steps at most before its abort, not its 2000 tokens
    assert tokens_computed(engine) - before < 100 * per_token


async def test_discard_aborts_a_stream_never_read(engine, client):
    wait_idle(engine)
    stream = await submit_long(client, "never-read")
    await asyncio.sleep(0.2)  # queued and running
    await discard([stream])
    await asyncio.to_thread(wait_idle, engine)


async def test_a_client_gone_before_the_body_starts_leaves_nothing_running(engine, client):
    from serve_app.api.routes import EndingStreamingResponse

    wait_idle(engine)
    stream = await submit_long(client, "gone-early")

    async def body():
        async for out in stream:
            yield out.outputs[0].text if out.outputs else ""

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        raise OSError("the client is gone")  # before the response's first byte

    response = EndingStreamingResponse(body(), [stream], media_type="text/event-stream")
    scope = {"type": "http", "asgi": {"spec_version": "2.4"}, "method": "POST", "headers": []}
    with pytest.raises(Exception):  # noqa: B017 - Starlette's ClientDisconnect or the OSError
        await response(scope, receive, send)
    await asyncio.to_thread(wait_idle, engine)
