"""Structured outputs, tool calling, logit_bias and echo over HTTP, driven by the official SDK
on the random-weight tiny model: only the grammar can make its output valid."""

from __future__ import annotations

import json
import re
import shutil
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from transformers import AutoTokenizer

from serve_app.api.routes import create_app
from serve_app.engine.config import EngineConfig
from serve_app.runtime.factory import build_async_engine
from serve_app.tools.local_client import LocalEngineClient
from serve_app.tools.tokenizer import CHAT_TEMPLATE
from tests.api.inproc import serving, wait_idle

KEY = "test-key"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "unit": {"enum": ["c", "f"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
BAD_TOOL = {
    "type": "function",
    "function": {
        "name": "broken",
        "parameters": {"type": "object", "properties": {"x": {"type": "strin"}}},
    },
}
BAD_PATH = "tools[1].function.parameters"
# LangChain's default @tool schema: no additionalProperties, no bounds
OPEN_TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look a word up.",
        "parameters": {
            "type": "object",
            "properties": {
                "word": {"type": "string", "maxLength": 8},
                "limit": {"type": "integer"},
            },
            "required": ["word"],
        },
    },
}


class Pet(BaseModel):
    name: str = Field(max_length=6)
    kind: Literal["cat", "dog", "fish"]
    age: int = Field(ge=0, le=30)


def tool_model_dir(src, dst):
    """A copy of the tiny checkpoint whose tokenizer has the current (tool-aware) template,
    whatever template the shared prebuilt checkpoint was made with."""
    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(dst)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def server(qwen3_tiny, tmp_path_factory):
    model = tool_model_dir(qwen3_tiny, tmp_path_factory.mktemp("m") / "tiny")
    engine = build_async_engine(
        EngineConfig(model=str(model), num_kv_blocks=256, max_model_len=1024)
    )
    app = create_app(LocalEngineClient(engine, "tiny"), api_keys=frozenset({KEY}))
    with serving(app) as url:
        yield url, engine
    engine.shutdown()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


MSGS = [{"role": "user", "content": "Describe a pet as JSON."}]


# ---- response_format and structured_outputs --------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_parse_with_pydantic_model(client, seed):
    r = client.chat.completions.parse(
        model="tiny", messages=MSGS, response_format=Pet, seed=seed, max_tokens=200
    )
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "stop", msg.content
    assert isinstance(msg.parsed, Pet) and len(msg.parsed.name) <= 6


def test_json_object_with_n(client):
    r = client.chat.completions.create(
        model="tiny",
        messages=MSGS,
        response_format={"type": "json_object"},
        n=3,
        seed=4,
        max_tokens=300,
    )
    for c in r.choices:
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.message.content), dict)
    assert any(c.finish_reason == "stop" for c in r.choices)


def test_streamed_json_schema(client):
    schema = {**Pet.model_json_schema(), "additionalProperties": False}
    stream = client.chat.completions.create(
        model="tiny",
        messages=MSGS,
        seed=7,
        max_tokens=200,
        stream=True,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "pet", "schema": schema, "strict": True},
        },
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), schema)


def test_completions_json_schema_and_guided_alias(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    r = client.completions.create(
        model="tiny", prompt="JSON:", max_tokens=50, seed=1, extra_body={"guided_json": schema}
    )
    jsonschema.validate(json.loads(r.choices[0].text), schema)
    stream = client.completions.create(
        model="tiny",
        prompt="JSON:",
        max_tokens=50,
        seed=1,
        stream=True,
        extra_body={"structured_outputs": {"json": schema}},
    )
    assert "".join(c.choices[0].text for c in stream) == r.choices[0].text


def test_regex_and_choice_via_extra_body(client):
    r = client.chat.completions.create(
        model="tiny",
        messages=MSGS,
        max_tokens=40,
        seed=3,
        extra_body={"structured_outputs": {"regex": r"[A-Z][a-z]{2,5} [0-9]{3}"}},
    )
    assert re.fullmatch(r"[A-Z][a-z]{2,5} [0-9]{3}", r.choices[0].message.content)
    r = client.completions.create(
        model="tiny",
        prompt="Pick:",
        max_tokens=10,
        n=4,
        seed=2,
        extra_body={"guided_choice": ["red", "green", "blue"]},
    )
    assert {c.text for c in r.choices} <= {"red", "green", "blue"}
    r = client.completions.create(
        model="tiny",
        prompt="Say:",
        max_tokens=20,
        seed=3,
        extra_body={"structured_outputs": {"grammar": 'start: "yes" | "no" " way"'}},
    )
    assert r.choices[0].text in {"yes", "no way"}


# ---- tools -----------------------------------------------------------------------------------


def test_named_tool_choice_arguments_validate(client):
    for seed in range(3):
        r = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=[WEATHER, TIME],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            seed=seed,
            max_tokens=120,
        )
        c = r.choices[0]
        assert c.finish_reason == "stop", c.message  # OpenAI's for a named tool_choice
        (call,) = c.message.tool_calls
        assert call.function.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS["get_weather"])


def test_required_tool_choice_streamed(client):
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "What time is it in Tokyo?"}],
        tools=[WEATHER, TIME],
        tool_choice="required",
        seed=5,
        max_tokens=300,
        stream=True,
    )
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        ch = chunk.choices[0]
        finish = ch.finish_reason or finish
        for d in ch.delta.tool_calls or ():
            if d.index not in calls:  # the first delta of a call has its id and name
                assert d.id and d.function.name
                calls[d.index] = {"name": d.function.name, "args": d.function.arguments or ""}
            else:
                assert d.id is None and d.function.name is None
                calls[d.index]["args"] += d.function.arguments
    assert finish == "tool_calls" and calls
    for call in calls.values():
        jsonschema.validate(json.loads(call["args"]), SCHEMAS[call["name"]])


@pytest.mark.parametrize("seed", range(6))
def test_open_tool_schemas_are_closed_by_default(client, seed):
    """A tool schema that says nothing of other keys gets none: the random model never pads
    the arguments with invented keys (it did under JSON Schema's open default)."""
    r = client.chat.completions.create(
        model="tiny",
        messages=MSGS,
        tools=[OPEN_TOOL],
        tool_choice="required",
        max_tokens=120,
        seed=seed,
    )
    (call,) = r.choices[0].message.tool_calls
    args = json.loads(call.function.arguments)
    assert "word" in args and set(args) <= {"word", "limit"}


def test_strict_false_keeps_an_open_schema_open(server):
    """strict: false is JSON Schema as written (keys beyond `properties` allowed): this schema
    needs one, so it is a 200 open and a 400 closed (the default, and strict: true)."""
    schema = {
        "type": "object",
        "properties": {"a": {"const": 1}},
        "required": ["a"],
        "minProperties": 2,
    }

    def status(strict):
        fmt = {"name": "x", "schema": schema}
        if strict is not None:
            fmt["strict"] = strict
        r = httpx.post(
            f"{server[0]}/v1/completions",
            json={
                "prompt": "hi",
                "max_tokens": 3,
                "response_format": {"type": "json_schema", "json_schema": fmt},
            },
            headers={"Authorization": f"Bearer {KEY}"},
        )
        return r.status_code, r.json()

    assert status(False)[0] == 200
    for strict in (None, True):
        code, body = status(strict)
        assert code == 400 and body["error"]["param"] == "response_format.json_schema.schema"
        assert "strict is false" in body["error"]["message"]
    wait_idle(server[1])


def test_langchain_bind_tools_with_a_default_tool(server):
    """LangChain's `bind_tools(...).invoke` with a plain `@tool` (its schema says nothing of
    other keys and bounds nothing) and tool_choice="any" (sent as "required"): every call is
    valid and names only declared keys. Under JSON Schema's open default the random model
    padded such arguments with invented keys until max_tokens."""
    pytest.importorskip("langchain_openai")
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def add(a: int, b: int, exact: bool = True) -> int:
        """Add two integers."""
        return a + b

    assert "additionalProperties" not in add.tool_call_schema.model_json_schema()
    llm = ChatOpenAI(
        model="tiny", base_url=server[0] + "/v1", api_key=KEY, max_tokens=100, max_retries=0
    )
    bound = llm.bind_tools([add], tool_choice="any")
    for seed in range(3):
        msg = bound.invoke("What is 2 + 3?", seed=seed)
        assert msg.invalid_tool_calls == [] and len(msg.tool_calls) >= 1
        for call in msg.tool_calls:
            assert call["name"] == "add" and {"a", "b"} <= set(call["args"]) <= {"a", "b", "exact"}
    wait_idle(server[1])


def test_tool_result_round_trip_and_template(client, server):
    msgs = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    r = client.chat.completions.create(
        model="tiny", messages=msgs, tools=[WEATHER], tool_choice="none", max_tokens=5
    )
    assert r.choices[0].message.tool_calls is None
    toks = httpx.post(
        f"{server[0]}/tokenize",
        json={"messages": msgs, "tools": [WEATHER]},
        headers={"Authorization": f"Bearer {KEY}"},
    ).json()["tokens"]
    text = AutoTokenizer.from_pretrained(server[1].engine.config.model).decode(toks)
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    )
    assert "<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response><|im_end|>" in text
    assert "<tools>\n" + json.dumps(WEATHER) in text


# ---- logit_bias, echo, max_completion_tokens -----------------------------------------------


def test_logit_bias(client, server):
    tok = AutoTokenizer.from_pretrained(server[1].engine.config.model)
    target = tok.encode(" the")[0]
    r = client.completions.create(
        model="tiny", prompt="Hi", max_tokens=4, seed=0, logit_bias={str(target): 100}
    )
    assert r.choices[0].text == tok.decode([target] * 4)


def test_echo_logprobs_lm_eval_shape(client, server):
    prompt = "The river bends and the water runs"
    r = client.completions.create(
        model="tiny", prompt=prompt, echo=True, logprobs=1, max_tokens=1, temperature=0
    )
    c = r.choices[0]
    n_prompt = r.usage.prompt_tokens
    assert c.text.startswith(prompt)
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == n_prompt + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == c.text and lp.text_offset[0] == 0
    # max_completion_tokens works on completions too
    r2 = client.completions.create(
        model="tiny", prompt=prompt, extra_body={"max_completion_tokens": 3}, temperature=0
    )
    assert r2.usage.completion_tokens == 3


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_max_tokens_0_scores_the_prompt_alone(client, server, stream):
    """OpenAI's legacy scoring (lm-eval's loglikelihood of a whole prompt): the prompt and its
    logprobs, no completion token."""
    prompt = "The river bends and the water runs"
    kw = dict(model="tiny", prompt=prompt, echo=True, logprobs=1, max_tokens=0)
    if stream:
        chunks = list(
            client.completions.create(**kw, stream=True, stream_options={"include_usage": True})
        )
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        tokens = [
            t
            for c in chunks
            if c.choices and c.choices[0].logprobs
            for t in c.choices[0].logprobs.tokens
        ]
        usage = chunks[-1].usage
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    else:
        r = client.completions.create(**kw)
        text, tokens, usage = r.choices[0].text, r.choices[0].logprobs.tokens, r.usage
        assert r.choices[0].finish_reason == "length"
        lps = r.choices[0].logprobs.token_logprobs
        assert lps[0] is None and all(x <= 0 for x in lps[1:])
    assert text == prompt and "".join(tokens) == prompt
    assert len(tokens) == usage.prompt_tokens and usage.completion_tokens == 0
    wait_idle(server[1])


def test_max_tokens_0_without_echo_is_a_400(server):
    r = httpx.post(
        f"{server[0]}/v1/completions",
        json={"prompt": "hi", "max_tokens": 0},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


# ---- what cannot be honoured is a 400 -----------------------------------------------------


@pytest.mark.parametrize(
    "path, extra, param",
    [
        ("chat", {"response_format": {"type": "yaml"}}, "response_format"),
        (
            "chat",
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nope"}},
                }
            },
            "response_format.json_schema.schema",
        ),
        ("chat", {"structured_outputs": {"json": {"type": "nope"}}}, "structured_outputs.json"),
        ("completions", {"guided_json": {"minLength": "x"}}, "guided_json"),
        # a tool's schema is checked whether or not tool_choice enforces it
        *[
            ("chat", {"tools": [WEATHER, BAD_TOOL], "tool_choice": choice}, BAD_PATH)
            for choice in ("auto", "none", "required")
        ],
        ("chat", {"tools": [{**TIME, "function": {"name": "a b"}}]}, "tools[0].function.name"),
        ("chat", {"structured_outputs": {"regex": "a(b"}}, "structured_outputs"),
        (
            "chat",
            {"structured_outputs": {"structural_tag": "x"}},
            "structured_outputs.structural_tag",
        ),
        ("chat", {"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
        (
            "chat",
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ("chat", {"tool_choice": "required"}, "tool_choice"),
        ("chat", {"logit_bias": {"99999999": 5}}, "logit_bias"),
        ("chat", {"logit_bias": {"5": 500}}, "logit_bias"),
        ("chat", {"logit_bias": {"x": 1}}, "logit_bias"),
        ("chat", {"functions": [{"name": "f"}]}, "functions"),
        ("chat", {"modalities": ["text", "audio"]}, "modalities[1]"),
        ("completions", {"suffix": "end"}, "suffix"),
        ("completions", {"best_of": 3}, "best_of"),
        ("completions", {"guided_json": "{not json"}, "guided_json"),
    ],
)
def test_unhonourable_requests_are_400(server, path, extra, param):
    url, engine = server
    body = {"max_tokens": 4, **extra}
    if path == "chat":
        body["messages"] = MSGS
    else:
        body["prompt"] = "hi"
    r = httpx.post(
        f"{url}/v1/{'chat/completions' if path == 'chat' else 'completions'}",
        json={**body, "stream": False},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"
    # one line naming its path, never the internal grammar text
    assert "\n" not in err["message"] and "<tool_call>" not in err["message"]
    assert "x-guidance" not in err["message"]
    if "." in param or param == "guided_json":  # a path: the message starts with it
        assert err["message"].startswith(param)
    wait_idle(engine)


def test_sdk_raises_bad_request_for_unknown_tool(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="tiny",
            messages=MSGS,
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "missing"}},
            stream=True,
        )


def test_disconnect_mid_grammar_stream_frees_blocks(server, client):
    stream = client.chat.completions.create(
        model="tiny",
        messages=MSGS,
        max_tokens=400,
        stream=True,
        extra_body={"structured_outputs": {"regex": "[a-z ]{300}"}},
    )
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    wait_idle(server[1])
