"""The JSON schemas in a request: tools' `parameters`, `response_format`'s json_schema,
`structured_outputs.json`, `guided_json`.

- Checked up front (`check_schema`): an invalid one is a 400 naming its path
  (`tools[1].function.parameters`), in one line, whether or not it is enforced (a tool under
  `tool_choice: "auto"` too), before anything is queued.
- Closed by default (`closed`): an object schema with `properties` and no word on other keys
  gets `additionalProperties: false`, as vLLM's default backend (xgrammar, `strict_mode=True`)
  and OpenAI's `strict: true` enforce it; `strict: false` keeps JSON Schema's open objects.
  docs/structured-outputs.md has the comparison.
"""

from __future__ import annotations

import copy
import functools
import json
from typing import Any

from serve_app.engine.errors import InvalidRequestError, grammar_error_line
from serve_app.engine.request import JSON_OPTIONS

# Keys whose value is one schema / a list of schemas / a map of name -> schema.
_ONE = ("items", "additionalItems", "not", "if", "then", "else", "contains", "propertyNames")
_LIST = ("prefixItems", "anyOf", "oneOf")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
# An object says something about keys beyond `properties` with one of these.
_OPEN_KEYS = ("additionalProperties", "patternProperties", "unevaluatedProperties")


def closed(schema: Any) -> Any:
    """A copy of `schema` where every object schema with `properties` that says nothing of
    other keys admits no others. Left as written: a member of a multi-schema `allOf` (closing
    each side of an intersection would refuse the other's keys) and an object whose `required`
    names a key missing from its `properties`."""
    schema = copy.deepcopy(schema)
    _close(schema)
    return schema


def _close(node: Any, in_intersection: bool = False) -> None:
    if isinstance(node, list):  # prefixItems, anyOf, oneOf; draft-4 tuple `items`
        for sub in node:
            _close(sub)
        return
    if not isinstance(node, dict):
        return
    for key in _ONE + _LIST:
        _close(node.get(key))
    for key in _MAP:
        if isinstance(node.get(key), dict):
            _close(list(node[key].values()))
    if isinstance(node.get("additionalProperties"), dict):
        _close(node["additionalProperties"])
    all_of = node.get("allOf")
    if isinstance(all_of, list):
        for sub in all_of:
            _close(sub, in_intersection=len(all_of) > 1)
    props = node.get("properties")
    if in_intersection or not isinstance(props, dict) or any(k in node for k in _OPEN_KEYS):
        return
    required = node.get("required")
    if isinstance(required, list) and not set(required) <= props.keys():
        return
    node["additionalProperties"] = False


def enforced(schema: Any, param: str, strict: bool | None = None) -> dict:
    """The schema the grammar enforces for `param`: closed unless `strict` is false, and
    checked (a 400 naming `param` when invalid)."""
    check_schema(schema, param)
    if strict is False:
        return schema
    final = closed(schema)
    if final != schema and (problem := _schema_problem(_text(final))):
        raise InvalidRequestError(
            f"{param}: invalid JSON schema once closed: {problem} (objects admit only their "
            "properties unless strict is false)",
            param,
        )
    return final


def check_schema(schema: Any, param: str) -> None:
    """A 400 naming `param` when `schema` is not a JSON schema the grammar engine takes."""
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"{param}: invalid JSON schema: it must be an object", param)
    if problem := _schema_problem(_text(schema)):
        raise InvalidRequestError(f"{param}: invalid JSON schema: {problem}", param)


def _text(schema: dict) -> str:
    return json.dumps(schema, sort_keys=True, ensure_ascii=False)


@functools.lru_cache(maxsize=256)
def _schema_problem(text: str) -> str:
    """llguidance's first line about the schema ('' when it compiles). No tokenizer needed."""
    from llguidance import LLMatcher

    try:
        grammar = LLMatcher.grammar_from_json_schema(json.loads(text), overrides=JSON_OPTIONS)
        problem = LLMatcher.validate_grammar(grammar)
    except (ValueError, TypeError) as e:
        problem = str(e)
    if problem.startswith("WARNING") or not problem.strip():
        return ""
    return grammar_error_line(problem)
