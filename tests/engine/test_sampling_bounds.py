"""The API's schema states the engine's sampling ranges (SAMPLING_BOUNDS): SamplingParams
accepts every edge the table allows and refuses just past it."""

from __future__ import annotations

import pytest

from serve_app.api.protocol import ChatCompletionRequest, CompletionRequest
from serve_app.engine.errors import InvalidRequestError
from serve_app.engine.request import SAMPLING_BOUNDS, SamplingParams

EPS = {int: 1, float: 1e-6}


def params(name: str, value) -> SamplingParams:
    extra = {"max_tokens": None} if name == "min_tokens" else {}
    return SamplingParams(**{name: value, **extra})


@pytest.mark.parametrize("name", sorted(SAMPLING_BOUNDS))
def test_engine_and_schema_agree_at_each_edge(name):
    kind = float if any(isinstance(v, float) for v in SAMPLING_BOUNDS[name].values()) else int
    eps = EPS[kind]
    for op, edge in SAMPLING_BOUNDS[name].items():
        inside = {"ge": edge, "le": edge, "gt": edge + eps, "lt": edge - eps}[op]
        outside = {"ge": edge - eps, "le": edge + eps, "gt": edge, "lt": edge}[op]
        params(name, kind(inside))
        with pytest.raises(InvalidRequestError):
            params(name, kind(outside))


def test_the_schema_carries_them():
    props = CompletionRequest.model_json_schema()["properties"]
    assert props["n"]["minimum"] == 1 and props["n"]["maximum"] == 128
    temp = next(s for s in props["temperature"]["anyOf"] if s.get("type") == "number")
    assert temp["minimum"] == 0 and temp["maximum"] == 100
    chat = ChatCompletionRequest.model_json_schema()["properties"]
    assert chat["messages"]["minItems"] == 1
