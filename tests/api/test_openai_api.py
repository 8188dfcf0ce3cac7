"""The OpenAI-compatible HTTP API, served in-process by uvicorn, driven by the official SDK."""

from __future__ import annotations

import httpx
import openai
import pytest

from serve_app.api.routes import create_app
from serve_app.engine.config import EngineConfig
from serve_app.runtime.factory import build_async_engine
from serve_app.tools.local_client import LocalEngineClient
from tests.api.inproc import serving, wait_idle

KEY = "test-key"


@pytest.fixture(scope="module")
def server(qwen3_tiny):
    engine = build_async_engine(
        EngineConfig(model=str(qwen3_tiny), num_kv_blocks=128, max_model_len=512)
    )
    app = create_app(LocalEngineClient(engine, "tiny"), api_keys=frozenset({KEY}))
    with serving(app) as url:
        yield url, engine
    engine.shutdown()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


def test_models_lists_id_and_root(client):
    m = client.models.list().data[0]
    assert m.id == "tiny" and m.model_extra["root"] == "tiny"


def test_completion_and_usage(client):
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    r2 = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0)
    assert r2.choices[0].text == r.choices[0].text  # greedy is deterministic


def test_completion_batch_n_and_logprobs(client):
    r = client.completions.create(
        model="tiny", prompt=["a b", "c d"], n=2, max_tokens=3, logprobs=2, seed=1
    )
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.completion_tokens == 12
    assert all(len(c.logprobs.tokens) == 3 for c in r.choices)


def test_streaming_completion_matches_non_streaming(client):
    kw = dict(model="tiny", prompt="Once upon", max_tokens=8, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    chunks = list(
        client.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


@pytest.mark.parametrize("stream", [False, True])
def test_usage_reports_the_prompt_tokens_taken_from_the_prefix_cache(client, stream):
    """OpenAI's usage.prompt_tokens_details.cached_tokens: 0 for a prompt never seen, then its
    full blocks (16 tokens each; never the last token, whose logits are needed)."""
    prompt = f"{'stream' if stream else 'plain'} " + " ".join(f"w{i}" for i in range(40))
    kw = dict(model="tiny", prompt=prompt, max_tokens=3, temperature=0)
    if stream:
        kw |= dict(stream=True, stream_options={"include_usage": True})

    def usage():
        r = client.completions.create(**kw)
        return list(r)[-1].usage if stream else r.usage

    first, second = usage(), usage()
    assert first.prompt_tokens == second.prompt_tokens > 32
    assert first.prompt_tokens_details.cached_tokens == 0
    assert second.prompt_tokens_details.cached_tokens == (second.prompt_tokens - 1) // 16 * 16
    msgs = [{"role": "user", "content": prompt}]
    chat = [client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2).usage]
    chat.append(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2).usage)
    assert [u.prompt_tokens_details.cached_tokens for u in chat] == [
        0,
        (chat[1].prompt_tokens - 1) // 16 * 16,
    ]


def test_chat_streaming_and_max_completion_tokens(client):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_completion_tokens=4)
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens <= 4
    stream = client.chat.completions.create(
        model="tiny",
        messages=msgs,
        max_tokens=4,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == 4


def test_tokenize_detokenize(server):
    url = server[0]
    h = {"Authorization": f"Bearer {KEY}"}
    toks = httpx.post(f"{url}/tokenize", json={"prompt": "café 東京"}, headers=h).json()
    assert toks["count"] == len(toks["tokens"]) > 0
    text = httpx.post(f"{url}/detokenize", json={"tokens": toks["tokens"]}, headers=h).json()
    assert text["prompt"] == "café 東京"


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"prompt": "", "max_tokens": 4}, 400, "prompt"),
        ({"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
        ({"prompt": "hi", "temperature": -2}, 400, "temperature"),
        ({"prompt": "hi " * 600}, 400, "prompt"),
        ({"prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
        ({"prompt": [1, 2, 99999999]}, 400, "prompt"),
        ({"prompt": 5}, 400, "prompt"),
        ({"max_tokens": 3}, 400, "prompt"),
        ({"prompt": "hi", "model": "nope"}, 404, "model"),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, param):
    url, engine = server
    r = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]
    wait_idle(engine)


def test_models_retrieve_served_model_and_404_for_another(client):
    m = client.models.retrieve("tiny")  # the SDK's GET /v1/models/{id}
    assert m.id == "tiny" and m.object == "model"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("qwen3_moe-small")
    assert e.value.body["type"] == "not_found_error" and e.value.body["param"] == "model"


@pytest.mark.parametrize(
    "method, path, status, type_",
    [
        ("GET", "/v1/nope", 404, "not_found_error"),
        ("POST", "/nope", 404, "not_found_error"),
        ("GET", "/v1/completions", 405, "method_not_allowed"),
        ("DELETE", "/v1/models", 405, "method_not_allowed"),
    ],
)
def test_unknown_routes_and_methods_answer_in_openai_shape(server, method, path, status, type_):
    r = httpx.request(method, server[0] + path, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status
    assert set(r.json()) == {"error"}  # not FastAPI's {"detail": ...}
    err = r.json()["error"]
    assert err["type"] == type_ and err["code"] == status and path in err["message"]


@pytest.mark.parametrize(
    "route, body, param, words",
    [
        # a body that is not JSON: one line saying so, no made-up param
        ("/v1/completions", b'{"prompt": "hi",', None, "not valid JSON"),
        ("/v1/completions", b"[1]", None, "request body"),
        # a nested missing field is named by its path
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "hi"}],'
            b' "tools": [{"type": "function", "function": {"parameters": {}}}]}',
            "tools[0].function.name",
            "Field required",
        ),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "robot", "content": "hi"}]}',
            "messages[0].role",
            "messages[0].role",
        ),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "hi"}], "tool_choice": {"type": "x"}}',
            "tool_choice",
            "tool_choice",
        ),
    ],
)
def test_malformed_bodies_are_named_by_their_path(server, route, body, param, words):
    r = httpx.post(
        server[0] + route,
        content=body,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"] and "\n" not in err["message"]


def test_auth_required(server):
    r = httpx.post(f"{server[0]}/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.get(f"{server[0]}/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert httpx.get(f"{server[0]}/health").status_code == 200


def test_client_disconnect_mid_stream_frees_blocks(server, client):
    url, engine = server
    stream = client.completions.create(
        model="tiny", prompt="abc", max_tokens=400, stream=True, extra_body={"ignore_eos": True}
    )
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    wait_idle(engine)


def test_slow_sse_reader_gets_every_token_once_in_order(server):
    from tests.streaming_checks import check_slow_reader

    auth = {"Authorization": f"Bearer {KEY}"}
    check_slow_reader(server[0], "tiny", "The river bends", headers=auth)
    wait_idle(server[1])


def test_stream_interval_groups_tokens_after_the_first(qwen3_tiny):
    from tests.streaming_checks import read_sse, tokens_of

    engine = build_async_engine(
        EngineConfig(model=str(qwen3_tiny), num_kv_blocks=64, max_model_len=256)
    )
    app = create_app(LocalEngineClient(engine, "tiny"), api_keys=frozenset(), stream_interval=4)
    try:
        with serving(app) as url:
            body = {
                "model": "tiny",
                "prompt": "Once upon a time",
                "max_tokens": 11,
                "temperature": 0,
                "ignore_eos": True,
                "logprobs": 1,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            counts, _, usage = tokens_of(read_sse(f"{url}/v1/completions", body))
        assert counts == [1, 4, 4, 2] and usage["completion_tokens"] == 11
    finally:
        engine.shutdown()
