"""The request's JSON schemas: closed by default (exact output of `closed`), strict: false
left open, and an invalid schema a one-line 400 naming its path."""

from __future__ import annotations

import copy
import json

import pytest

from serve_app.api.protocol import ChatCompletionRequest
from serve_app.api.schemas import check_schema, closed, enforced
from serve_app.engine.errors import InvalidRequestError

OBJ = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}


def shut(schema: dict) -> dict:
    return {**schema, "additionalProperties": False}


def test_closes_every_object_with_properties_at_any_depth():
    schema = {
        "type": "object",
        "properties": {
            "inner": OBJ,
            "many": {"type": "array", "items": OBJ},
            "either": {"anyOf": [OBJ, {"type": "null"}]},
            "ref": {"$ref": "#/$defs/Thing"},
        },
        "$defs": {"Thing": OBJ},
    }
    before = copy.deepcopy(schema)
    out = closed(schema)
    assert schema == before  # a copy: the request's own schema is left alone
    assert out["additionalProperties"] is False
    props = out["properties"]
    assert props["inner"] == shut(OBJ) and props["many"]["items"] == shut(OBJ)
    assert props["either"]["anyOf"] == [shut(OBJ), {"type": "null"}]
    assert out["$defs"]["Thing"] == shut(OBJ)


@pytest.mark.parametrize(
    "schema",
    [
        {**OBJ, "additionalProperties": True},  # the schema says it: kept
        {**OBJ, "additionalProperties": {"type": "integer"}},
        {**OBJ, "patternProperties": {"^x_": {"type": "integer"}}},
        {"type": "object"},  # no properties: a free-form object (json_object)
        {"type": "object", "properties": {"a": {}}, "required": ["b"]},  # would be unsatisfiable
        {"allOf": [OBJ, {"type": "object", "properties": {"b": {}}}]},  # an intersection
    ],
)
def test_leaves_objects_that_say_something_else(schema):
    assert closed(schema) == schema


def test_a_single_allof_member_is_closed():
    assert closed({"allOf": [OBJ]}) == {"allOf": [shut(OBJ)]}


def test_strict_false_is_the_schema_as_written():
    assert enforced(OBJ, "p", strict=False) == OBJ
    assert enforced(OBJ, "p", strict=True) == enforced(OBJ, "p") == shut(OBJ)


@pytest.mark.parametrize(
    "schema, words",
    [
        ({"type": "strin"}, "Invalid type"),
        ({"$ref": "#/nope"}, "does not exist"),
        ({"type": "string", "format": "weird"}, "Unknown format"),
        ([1, 2], "must be an object"),
    ],
)
def test_invalid_schemas_are_one_line_naming_the_path(schema, words):
    with pytest.raises(InvalidRequestError) as e:
        check_schema(schema, "tools[2].function.parameters")
    assert e.value.param == "tools[2].function.parameters"
    assert e.value.message.startswith("tools[2].function.parameters: invalid JSON schema")
    assert words in e.value.message and "\n" not in e.value.message


def test_required_tool_grammar_embeds_the_closed_schemas():
    body = ChatCompletionRequest.model_validate(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [
                {"type": "function", "function": {"name": "open", "parameters": OBJ}},
                {
                    "type": "function",
                    "function": {"name": "loose", "parameters": OBJ, "strict": False},
                },
            ],
            "tool_choice": "required",
        }
    )
    grammar = body.to_sampling_params().structured.value
    args = [
        json.loads(line.split("%json ", 1)[1]) for line in grammar.splitlines() if "%json" in line
    ]
    assert args[0]["additionalProperties"] is False  # closed by default
    assert "additionalProperties" not in args[1]  # strict: false, as written
