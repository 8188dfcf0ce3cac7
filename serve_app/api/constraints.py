"""A request's output constraint: OpenAI's `response_format`, vLLM's `structured_outputs` and its
older `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`, turned into the one
GrammarSpec the engine enforces (docs/structured-outputs.md)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from serve_app.api.checked import CheckedModel
from serve_app.api.schemas import enforced
from serve_app.engine.errors import InvalidRequestError
from serve_app.engine.request import GrammarSpec

STRUCTURED_KEYS = ("json", "regex", "choice", "grammar")  # the kinds of guided_<kind>


class JsonSchemaFormat(CheckedModel):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(CheckedModel):
    """OpenAI's response_format: text, json_object or json_schema (enforced by a grammar)."""

    type: str
    json_schema: JsonSchemaFormat | None = None

    def grammar(self) -> GrammarSpec | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return GrammarSpec("json", '{"type": "object"}', "response_format")
        if self.type == "json_schema":
            if self.json_schema is None:
                raise InvalidRequestError(
                    "response_format.json_schema is required for type json_schema",
                    "response_format",
                )
            param = "response_format.json_schema.schema"
            schema = self.json_schema.schema_ or {"type": "object"}
            schema = enforced(schema, param, self.json_schema.strict)
            return GrammarSpec("json", _canonical(schema), param)
        raise InvalidRequestError(
            f"response_format.type {self.type!r} is not supported "
            "(one of 'text', 'json_object', 'json_schema')",
            "response_format",
        )


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` (extra_body): exactly one of json, regex, choice, grammar,
    json_object. Other vLLM keys (structural_tag, whitespace_pattern...) are a 400."""

    model_config = ConfigDict(extra="forbid")

    json_object: bool | None = None

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


def _canonical(schema: Any) -> str:
    return json.dumps(schema, sort_keys=True, ensure_ascii=False)


def _spec(kind: str, value: Any, param: str) -> GrammarSpec:
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise InvalidRequestError(f"{param}: json is not valid JSON: {e}", param) from e
        return GrammarSpec("json", _canonical(enforced(value, param)), param)
    if kind == "choice":
        return GrammarSpec("choice", json.dumps(list(value), ensure_ascii=False), param)
    return GrammarSpec(kind, value, param)


def one_constraint(
    response_format: ResponseFormat | None,
    structured_outputs: StructuredOutputs | None,
    guided: dict[str, Any],
) -> GrammarSpec | None:
    """The request's one output constraint, from response_format, structured_outputs or
    vLLM's older guided_<kind> fields (`guided`: kind -> value or None); two are a 400."""
    found: list[GrammarSpec] = []
    if response_format is not None:
        spec = response_format.grammar()
        found += [spec] if spec is not None else []
    if structured_outputs is not None:
        so = structured_outputs
        values = {"json": so.json_, "regex": so.regex, "choice": so.choice, "grammar": so.grammar}
        found += [
            _spec(k, v, "structured_outputs.json" if k == "json" else "structured_outputs")
            for k, v in values.items()
            if v is not None
        ]
    found += [_spec(k, v, f"guided_{k}") for k, v in guided.items() if v is not None]
    if len(found) > 1:
        raise InvalidRequestError(
            "give at most one output constraint (response_format, structured_outputs, "
            "guided_json/regex/choice/grammar)",
            found[1].param,
        )
    return found[0] if found else None
