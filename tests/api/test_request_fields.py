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
from tests.streaming_checks import read_sse

# the project's template, plus a variable that only chat_template_kwargs can set, and a line
# per message key that the template should (reasoning_content) or should never (bogus) see
TEMPLATE = (
    "{%- if motto is defined %}{{- motto + '\n' }}{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.reasoning_content is defined %}{{- m.reasoning_content + '\n' }}{%- endif %}"
    "{%- if m.bogus is defined %}{{- 'bogus bogus bogus\n' }}{%- endif %}"
    "{%- endfor %}" + CHAT_TEMPLATE
)
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
        for name in BODIES + ("StreamOptions",) + NESTED:
            assert schemas[name]["additionalProperties"] is additional, (url, name)


BODIES = ("CompletionRequest", "ChatCompletionRequest", "TokenizeRequest", "DetokenizeRequest")
NESTED = ("ChatMessage", "ToolCall", "FunctionCall", "Tool", "FunctionDef", "ResponseFormat")
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": [{**MSGS[0], "bogus": 1}]}, "messages[0].bogus"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "x": 1}]}]},
            "messages[0].content[0].x",
        ),
        (
            {
                "messages": [
                    *MSGS,
                    {"role": "assistant", "tool_calls": [{**CALL, "extra": 1}]},
                    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                ]
            },
            "messages[1].tool_calls[0].extra",
        ),
        (
            {"messages": MSGS, "tools": [{**TOOL, "function": {**TOOL["function"], "y": 1}}]},
            "tools[0].function.y",
        ),
        (
            {
                "messages": MSGS,
                "response_format": {"type": "json_schema", "json_schema": {"name": "a", "z": 1}},
            },
            "response_format.json_schema.z",
        ),
    ],
)
def test_an_unknown_key_inside_an_object_is_a_400_naming_its_path(servers, body, param, stream):
    strict, lax, engine = servers
    req = {**body, "max_tokens": 2, "stream": stream}
    r = post(strict, "chat/completions", req)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert r.json()["error"]["message"] == f"Unrecognized request argument supplied: {param}"
    if not stream:
        assert post(lax, "chat/completions", req).status_code == 200
    wait_idle(engine)


def test_tokenize_checks_the_keys_inside_its_messages(servers):
    strict, lax, _ = servers
    body = {"messages": [{**MSGS[0], "bogus": 1}]}
    r = httpx.post(f"{strict}/tokenize", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].bogus", r.text
    plain = httpx.post(f"{lax}/tokenize", json={"messages": MSGS}, timeout=30).json()
    assert httpx.post(f"{lax}/tokenize", json=body, timeout=30).json() == plain


@pytest.mark.parametrize(
    "path, body",
    [
        ("tokenize", {"prompt": "hi"}),
        ("tokenize", {"messages": MSGS}),
        ("detokenize", {"tokens": [1]}),
    ],
)
def test_tokenize_and_detokenize_name_their_unknown_fields(servers, path, body):
    """vLLM ignores them; here a field /tokenize does not know (another server's option that
    would change the count) is a 400 like on the other routes, and ignored in ignore mode."""
    strict, lax, _ = servers
    r = httpx.post(f"{strict}/{path}", json={**body, "bogus": 1}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "bogus"
    plain = httpx.post(f"{lax}/{path}", json=body, timeout=30).json()
    assert httpx.post(f"{lax}/{path}", json={**body, "bogus": 1}, timeout=30).json() == plain


def test_tokenize_counts_what_the_chat_would_prompt(servers):
    """chat_template_kwargs reach the template in /tokenize as in a chat request, so the
    count is the chat's prompt_tokens; the template's own arguments are refused the same way."""
    strict, _, engine = servers
    for kwargs in (None, {"motto": "carpe diem carpe diem"}):
        chat = post(
            strict,
            "chat/completions",
            {"messages": MSGS, "max_tokens": 1, "chat_template_kwargs": kwargs},
        )
        body = {"messages": MSGS, "chat_template_kwargs": kwargs}
        counted = httpx.post(f"{strict}/tokenize", json=body, timeout=30).json()["count"]
        assert counted == chat.json()["usage"]["prompt_tokens"], kwargs
    body = {"messages": MSGS, "chat_template_kwargs": {"tokenize": True}}
    r = httpx.post(f"{strict}/tokenize", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"
    wait_idle(engine)


def test_tokenize_returns_the_token_strings_when_asked(servers):
    strict = servers[0]
    tok = AutoTokenizer.from_pretrained(servers[2].engine.config.model)
    plain = httpx.post(f"{strict}/tokenize", json={"prompt": "café 東京"}, timeout=30).json()
    assert "token_strs" not in plain
    body = {"prompt": "café 東京", "return_token_strs": True}
    out = httpx.post(f"{strict}/tokenize", json=body, timeout=30).json()
    assert out["tokens"] == plain["tokens"]
    assert out["token_strs"] == tok.convert_ids_to_tokens(out["tokens"])
    assert tok.convert_tokens_to_string(out["token_strs"]) == "café 東京"


def test_ignore_mode_drops_unknown_keys_before_the_template(servers):
    """In ignore mode an unknown message key answers as if absent: it never reaches the chat
    template (the test template would print a line for `bogus`)."""
    _, lax, engine = servers
    base = {"messages": MSGS, "max_tokens": 1}
    without = post(lax, "chat/completions", base).json()["usage"]["prompt_tokens"]
    r = post(lax, "chat/completions", {**base, "messages": [{**MSGS[0], "bogus": 1}]})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == without
    tools = [{**TOOL, "bogus": 1, "function": {**TOOL["function"], "bogus": 2}}]
    a = post(lax, "chat/completions", {**base, "tools": [TOOL]}).json()["usage"]
    b = post(lax, "chat/completions", {**base, "tools": tools}).json()["usage"]
    assert a["prompt_tokens"] == b["prompt_tokens"]
    wait_idle(engine)


def test_an_answer_sent_back_as_history_is_accepted(servers):
    """The SDK's own dump of an answer (refusal, annotations, audio, function_call: null) goes
    back into the next request as it is, as with OpenAI."""
    strict, _, engine = servers
    client = openai.OpenAI(base_url=strict + "/v1", api_key="-", max_retries=0)
    first = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=3)
    answer = first.choices[0].message.model_dump()
    assert {"refusal", "annotations", "audio", "function_call"} <= answer.keys()
    history = [*MSGS, answer, {"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(model="tiny", messages=history, max_tokens=3)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    wait_idle(engine)


@pytest.mark.parametrize(
    "key, value", [("audio", {"id": "audio_1"}), ("function_call", {"name": "f", "arguments": ""})]
)
def test_a_message_key_that_cannot_be_honoured_is_a_400_in_both_modes(servers, key, value):
    for url in servers[:2]:
        msgs = [*MSGS, {"role": "assistant", "content": "ok", key: value}]
        r = post(url, "chat/completions", {"messages": msgs, "max_tokens": 1})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == f"messages[1].{key}"


def test_a_refusal_is_the_text_of_a_message_without_content(servers):
    strict = servers[0]

    def prompt_tokens(assistant: dict) -> int:
        body = {"messages": [*MSGS, assistant, *MSGS], "max_tokens": 1}
        r = post(strict, "chat/completions", body)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]

    said = prompt_tokens({"role": "assistant", "content": "I cannot help with that"})
    refused = prompt_tokens(
        {"role": "assistant", "content": None, "refusal": "I cannot help with that"}
    )
    assert refused == said > prompt_tokens({"role": "assistant", "content": None})


def test_reasoning_content_reaches_the_template(servers):
    """vLLM passes a message's reasoning_content to the chat template (Qwen3's uses it for the
    turns after the last user message); so does this server."""
    strict = servers[0]
    base = {"messages": [*MSGS, {"role": "assistant", "content": "Hi"}], "max_tokens": 1}
    without = post(strict, "chat/completions", base).json()["usage"]["prompt_tokens"]
    thought = {"role": "assistant", "content": "Hi", "reasoning_content": "greet them back"}
    r = post(strict, "chat/completions", {**base, "messages": [*MSGS, thought]})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] > without


def test_an_unknown_stream_option_is_a_400_naming_it(servers):
    strict, lax, engine = servers
    body = {"prompt": "hi", "max_tokens": 2, "stream": True}
    r = post(strict, "completions", {**body, "stream_options": {"include_usage": 1, "bogus": 1}})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "stream_options.bogus"
    # the lenient server drops the unknown option and keeps the known one: the stream ends
    # with a finish reason and a usage chunk (not on the text: two sampled tokens of the
    # random-weight model may decode to nothing yet)
    lenient = {"include_usage": True, "bogus": 1}
    payloads = read_sse(f"{lax}/v1/completions", {**body, "stream_options": lenient})
    assert "error" not in payloads[-1], payloads[-1]
    assert [p["choices"][0]["finish_reason"] for p in payloads if p["choices"]][-1]
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] >= 1
    wait_idle(engine)


@pytest.mark.parametrize(
    "path, body", [("completions", {"prompt": "hi"}), ("chat/completions", {"messages": MSGS})]
)
def test_stream_options_without_stream_is_a_400(servers, path, body):
    strict, lax, _ = servers
    for url in (strict, lax):  # an option known and not applicable: refused in both modes
        r = post(url, path, {**body, "max_tokens": 2, "stream_options": {"include_usage": True}})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "stream_options"


def test_continuous_usage_stats_puts_the_usage_so_far_in_every_chunk(servers):
    """vLLM's stream_options.continuous_usage_stats (with include_usage)."""
    strict, _, engine = servers
    body = {
        "prompt": "Once upon a time",
        "max_tokens": 6,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    payloads = read_sse(f"{strict}/v1/completions", body)
    content, last = payloads[:-1], payloads[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 6
    done = [p["usage"]["completion_tokens"] for p in content]
    assert done == sorted(done) and done[-1] == 6 and done[0] >= 1
    prompt = {p["usage"]["prompt_tokens"] for p in payloads}
    assert prompt == {last["usage"]["prompt_tokens"]}
    plain = {**body, "stream_options": {"include_usage": True}}
    assert all(
        "usage" not in p or not p["choices"] for p in read_sse(f"{strict}/v1/completions", plain)
    )
    wait_idle(engine)


def test_include_obfuscation_pads_every_chunk_and_changes_nothing_else(servers):
    """OpenAI's stream_options.include_obfuscation: a random-length `obfuscation` string on
    every chunk; off unless asked."""
    strict, _, engine = servers
    body = {
        "messages": MSGS,
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    plain = read_sse(f"{strict}/v1/chat/completions", body)
    body["stream_options"]["include_obfuscation"] = True
    padded = read_sse(f"{strict}/v1/chat/completions", body)
    assert all("obfuscation" not in p for p in plain)
    pads = [p.pop("obfuscation") for p in padded]
    assert (
        all(isinstance(x, str) and 2 <= len(x) <= 64 for x in pads) and len(set(map(len, pads))) > 1
    )

    def text(ps):
        return "".join(p["choices"][0]["delta"].get("content") or "" for p in ps if p["choices"])

    assert text(padded) == text(plain) and padded[-1]["usage"]["completion_tokens"] == 8
    wait_idle(engine)
