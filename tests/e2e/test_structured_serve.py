"""Structured outputs and tool calls through the Serve app (ingress -> router -> 2 expert
shard actors): the grammar is compiled and enforced in the router replica's engine."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
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


class Pet(BaseModel):
    name: str = Field(max_length=6)
    kind: Literal["cat", "dog", "fish"]
    age: int = Field(ge=0, le=30)


def _client(app) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app.url}/v1", api_key="unused", max_retries=0)


def test_parse_with_pydantic_model_over_serve(serve_app):
    client = _client(serve_app)
    for seed in (0, 1, 2):
        r = client.chat.completions.parse(
            model="tiny",
            messages=[{"role": "user", "content": "A pet, as JSON"}],
            response_format=Pet,
            seed=seed,
            max_tokens=150,
        )
        assert isinstance(r.choices[0].message.parsed, Pet), r.choices[0].message.content


def test_named_tool_call_streamed_and_not_over_serve(serve_app):
    client = _client(serve_app)
    kw = dict(
        model="tiny",
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        seed=3,
        max_tokens=120,
    )
    r = client.chat.completions.create(**kw)
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "stop" and call.function.name == "get_weather"
    params = WEATHER["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), params)
    args, names = "", []
    for chunk in client.chat.completions.create(**kw, stream=True):
        for d in (chunk.choices[0].delta.tool_calls or ()) if chunk.choices else ():
            names += [d.function.name] if d.function.name else []
            args += d.function.arguments or ""
    assert names == ["get_weather"] and args == call.function.arguments


def test_bad_schema_is_400_over_serve(serve_app):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}},
    }
    r = httpx.post(f"{serve_app.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "response_format.json_schema.schema"
    # the ingress answers unknown routes in OpenAI's shape too
    r = httpx.get(f"{serve_app.url}/v1/nope", timeout=60)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
