"""Request objects that name the keys they do not know, at any depth.

A body's unknown field is a 400 naming it (`api.unknown_fields: reject`, as OpenAI answers);
so is an unknown key inside one of its objects: `messages[0].foo`, `tools[1].function.bar`,
`stream_options.baz`. The models keep such keys (`extra="allow"`) only to name them; in ignore
mode they are dropped (`declared_dump`), never passed on.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class CheckedModel(BaseModel):
    model_config = ConfigDict(extra="allow")

    def unknown_keys(self, path: str = "") -> list[str]:
        """`path.key` for every key this object and the checked objects in it do not declare
        (a request body's, at no path: `key`, `messages[0].key`)."""
        at = f"{path}." if path else ""
        return [at + k for k in self.model_extra or {}] + unknown_keys_in_fields(self, at)

    def declared_dump(self, **kwargs: Any) -> dict[str, Any]:
        """model_dump without the undeclared keys (at any depth)."""
        return _drop_extras(self, self.model_dump(**kwargs))


def checked_model_names() -> set[str]:
    """The names of every CheckedModel subclass (their /openapi.json schemas)."""
    out, todo = set(), list(CheckedModel.__subclasses__())
    while todo:
        cls = todo.pop()
        out.add(cls.__name__)
        todo += cls.__subclasses__()
    return out


def unknown_keys_in_fields(model: BaseModel, prefix: str = "") -> list[str]:
    """The unknown keys inside the checked objects of `model`'s declared fields."""
    fields = type(model).model_fields
    return [n for f in fields for n in nested_unknown_keys(getattr(model, f), prefix + f)]


def nested_unknown_keys(value: Any, path: str) -> list[str]:
    if isinstance(value, CheckedModel):
        return value.unknown_keys(path)
    if isinstance(value, list):
        return [n for i, v in enumerate(value) for n in nested_unknown_keys(v, f"{path}[{i}]")]
    return []


def _drop_extras(model: BaseModel, dumped: Any) -> Any:
    if not isinstance(dumped, dict):
        return dumped
    for key in model.model_extra or {}:
        dumped.pop(key, None)
    for name in type(model).model_fields:
        value = getattr(model, name)
        if name in dumped and isinstance(value, BaseModel):
            dumped[name] = _drop_extras(value, dumped[name])
        elif name in dumped and isinstance(value, list):
            dumped[name] = [
                _drop_extras(v, d) if isinstance(v, BaseModel) else d
                for v, d in zip(value, dumped[name], strict=True)
            ]
    return dumped
