"""Request fields the server does not know: a 400 naming them, as OpenAI answers (never a 200
that silently drops them), or ignored when the server is started with unknown_fields="ignore"
(vLLM's behaviour); and chat_template_kwargs, which reach the chat template."""

from __future__ import annotations

import shutil

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from serve_app.api.routes import create_app
from serve_app.engine.config import EngineConfig
from serve_app.runtime.factory import build_async_engine
from serve_app.tools.local_client import LocalEngineClient
from serve_app.tools.tokenizer import CHAT_TEMPLATE
from tests.api.inproc import serving, wait_idle

# the project's template, plus a variable that only chat_template_kwargs can set
TEMPLATE = "{%- if motto is defined %}{{- motto + '\n' }}{%- endif %}" + CHAT_TEMPLATE
MSGS = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def servers(qwen3_tiny, tmp_path_factory):
    """(strict URL, lenient URL, engine): one engine behind both settings."""
    model = tmp_path_factory.mktemp("m") / "tiny"
    shutil.copytree(qwen3_tiny, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(model)
    engine = build_async_engine(
        EngineConfig(model=str(model), num_kv_blocks=128, max_model_len=512)
    )
    client = LocalEngineClient(engine, "tiny")
    with serving(create_app(client, api_keys=frozenset())) as strict:
        with serving(create_app(client, api_keys=frozenset(), unknown_fields="ignore")) as lax:
            yield strict, lax, engine
    engine.shutdown()


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/{path}", json=body, timeout=60)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "path, body",
    [
        ("completions", {"prompt": "hi"}),
        ("chat/completions", {"messages": MSGS}),
    ],
)
def test_an_unknown_field_is_a_400_naming_it(servers, path, body, stream):
    strict, _, engine = servers
    r = post(strict, path, {**body, "max_tokens": 4, "stream": stream, "bogus_field": 1})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err == {
        "message": "Unrecognized request argument supplied: bogus_field",
        "type": "invalid_request_error",
        "param": "bogus_field",
        "code": 400,
    }
    wait_idle(engine)


def test_several_unknown_fields_are_named_together(servers):
    r = post(servers[0], "completions", {"prompt": "hi", "cache_salt": "x", "priority": 1})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == (
        "Unrecognized request arguments supplied: cache_salt, priority"
    )


def test_the_sdk_sees_a_bad_request(servers):
    client = openai.OpenAI(base_url=servers[0] + "/v1", api_key="-", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="Unrecognized request argument"):
        client.completions.create(
            model="tiny", prompt="hi", max_tokens=2, extra_body={"use_beam_search": True}
        )


def test_fields_ignored_on_purpose_and_implemented_extras_are_not_unknown(servers):
    """The fields documented as ignored on purpose (store, metadata, service_tier,
    prompt_cache_key, safety_identifier) and vLLM's sampling extras that the engine implements
    pass the strict check."""
    body = {
        "prompt": "hi",
        "max_tokens": 3,
        "store": False,
        "metadata": {"k": "v"},
        "service_tier": "auto",
        "prompt_cache_key": "k",
        "safety_identifier": "s",
        "user": "u1",
        "ignore_eos": True,
        "top_k": 5,
        "min_p": 0.1,
        "repetition_penalty": 1.1,
        "skip_special_tokens": True,
    }
    r = post(servers[0], "completions", body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3


def test_ignore_mode_answers_as_if_the_field_were_absent(servers):
    strict, lax, engine = servers
    body = {"prompt": "hi", "max_tokens": 5, "temperature": 0}
    plain = post(strict, "completions", body).json()["choices"][0]["text"]
    r = post(lax, "completions", {**body, "bogus_field": {"nested": [1, 2]}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == plain
    wait_idle(engine)


def test_a_field_that_cannot_be_honoured_keeps_its_own_reason_in_ignore_mode(servers):
    r = post(servers[1], "completions", {"prompt": "hi", "suffix": "end"})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "suffix"


def test_chat_template_kwargs_reach_the_template(servers):
    strict = servers[0]
    base = {"messages": MSGS, "max_tokens": 1}
    without = post(strict, "chat/completions", base).json()["usage"]["prompt_tokens"]
    r = post(
        strict,
        "chat/completions",
        {**base, "chat_template_kwargs": {"motto": "carpe diem carpe diem"}},
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] > without
    # a variable the template does not use changes nothing (Qwen3's enable_thinking here)
    r = post(strict, "chat/completions", {**base, "chat_template_kwargs": {"enable_thinking": 0}})
    assert r.json()["usage"]["prompt_tokens"] == without


@pytest.mark.parametrize("key", ["tokenize", "add_generation_prompt", "tools", "chat_template"])
def test_chat_template_kwargs_may_not_set_the_templates_own_arguments(servers, key):
    r = post(servers[0], "chat/completions", {"messages": MSGS, "chat_template_kwargs": {key: 1}})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "chat_template_kwargs"


def test_the_openapi_schema_says_what_each_mode_accepts(servers):
    """A client generated from /openapi.json must not send what a rejecting server refuses."""
    strict, lax, _ = servers
    for url, additional in ((strict, False), (lax, True)):
        schemas = httpx.get(f"{url}/openapi.json", timeout=30).json()["components"]["schemas"]
        for name in ("CompletionRequest", "ChatCompletionRequest"):
            assert schemas[name]["additionalProperties"] is additional, (url, name)
