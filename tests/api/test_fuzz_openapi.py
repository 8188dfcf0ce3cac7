"""Property-based fuzzing of every JSON route against the app's own OpenAPI schema
(hypothesis-jsonschema): any body the schema allows, and bodies of the wrong type, answer with
a status below 500 in OpenAI's error shape. Bounded: a fixed number of examples per route, a
tiny model with a 64-token context, and max_tokens clipped to 4."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from serve_app.api.routes import create_app
from serve_app.engine.config import EngineConfig
from serve_app.runtime.factory import build_async_engine
from serve_app.tools.local_client import LocalEngineClient

EXAMPLES = 60  # per route and kind; the whole module runs in about a minute on 2 cores
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,  # the same examples every run: a failure is reproducible
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def api(qwen3_tiny):
    engine = build_async_engine(
        EngineConfig(model=str(qwen3_tiny), num_kv_blocks=64, max_model_len=64)
    )
    app = create_app(LocalEngineClient(engine, "tiny"), api_keys=frozenset())
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, app.openapi()
    engine.shutdown()


def json_routes(openapi: dict) -> list[tuple[str, dict]]:
    """(path, body schema) of every POST route with a JSON body, refs resolvable at the root."""
    out = []
    for path, ops in openapi["paths"].items():
        body = ops.get("post", {}).get("requestBody", {})
        schema = body.get("content", {}).get("application/json", {}).get("schema")
        if schema is not None:
            out.append((path, {**schema, "components": openapi["components"]}))
    return out


def small(body: Any) -> Any:
    """Keep generation short: the schema allows any max_tokens, the test needs few."""
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int) and body[key] > 4:
                body[key] = 4
        if isinstance(body.get("n"), int) and body["n"] > 2:
            body["n"] = 2
        body.pop("model", None)  # a random name is a 404; covered elsewhere
    return body


def check(client: TestClient, path: str, body: Any) -> None:
    r = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code < 500, (path, body, r.status_code, r.text[:500])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) >= {"message", "type", "param", "code"} and err["code"] == r.status_code


def test_the_schema_lists_every_json_route(api):
    _, openapi = api
    paths = {p for p, _ in json_routes(openapi)}
    assert paths == set(JSON_ROUTES)


JSON_ROUTES = [
    "/v1/completions",
    "/v1/chat/completions",
    "/tokenize",
    "/detokenize",
    "/v1/load_lora_adapter",  # admin: without an API key configured, a 403 for any body
    "/v1/unload_lora_adapter",
]


@pytest.mark.parametrize("path", JSON_ROUTES)
def test_bodies_the_schema_allows_never_get_5xx(api, path):
    client, openapi = api
    schema = dict(json_routes(openapi))[path]

    @FUZZ
    @given(from_schema(schema))
    def run(body):
        check(client, path, small(body))

    run()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)


@pytest.mark.parametrize(
    "path", ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]
)
def test_bodies_of_any_shape_never_get_5xx(api, path):
    """Valid field names with values of any type, and arbitrary JSON."""
    client, openapi = api
    schema = dict(json_routes(openapi))[path]
    ref = schema["$ref"].rsplit("/", 1)[1]
    fields = list(openapi["components"]["schemas"][ref]["properties"])

    @FUZZ
    @given(st.dictionaries(st.sampled_from(fields), JSON, max_size=6) | JSON)
    def run(body):
        check(client, path, small(body))

    run()


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/tokenize", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/completions", {"prompt": []}, "prompt"),
        ("/v1/completions", {"prompt": "hi", "seed": 2**70}, "seed"),
        ("/detokenize", {"tokens": [-1]}, "tokens[0]"),  # the path of the bad item
    ],
)
def test_found_by_fuzzing_now_400(api, path, body, param):
    client, _ = api
    r = client.post(path, json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
