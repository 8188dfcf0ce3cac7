"""The LoRA adapters the API serves, by name, and what a request's `model` field means.

A request picks an adapter by naming it in `model` (or `<base>:<adapter>`, as SGLang
accepts); the base model's name (or no `model`) is the base model. The catalog maps a name to
its PEFT directory and a revision that each load bumps, carried to the engines as a
`LoraRef`: an engine that does not hold that revision loads it from the path on the request
(so router replicas that start later, or evicted it, need no broadcast). Loading and
unloading at run time are admin routes (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`,
vLLM's names and bodies), allowed only with an API key (MOESERVE_API_KEY): a server without
keys refuses them.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from pydantic import BaseModel, Field

from serve_app.api.errors import APIError
from serve_app.engine.outputs import LoraRef


class LoadLoraAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1, max_length=200, description="the name requests use")
    lora_path: str = Field(min_length=1, description="a PEFT LoRA directory on the server")
    pinned: bool = Field(
        False,
        description="never evicted from the engines (SGLang's `pinned`); at most max_loras - 1 "
        "adapters may be pinned. Unloading it still works.",
    )


class UnloadLoraAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1, max_length=200)


@dataclass(frozen=True, slots=True)
class _Entry:
    ref: LoraRef
    created: int


class AdapterCatalog:
    def __init__(
        self, base: str, adapters: dict[str, str] | None = None, pinned: tuple[str, ...] = ()
    ):
        self.base = base
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        # the last revision of every name ever loaded: an unload and a new load under the same
        # name still counts up, so no engine keeps serving the weights it held before
        self._revisions: dict[str, int] = {}
        for name, path in (adapters or {}).items():
            ref = LoraRef(name, str(path), 0, name in pinned)
            self._entries[name] = _Entry(ref, int(time.time()))
            self._revisions[name] = 0

    def resolve(self, model: str | None) -> LoraRef | None:
        """The adapter a request's `model` names (None: the base model); a 404 in OpenAI's
        shape for a name that is neither."""
        if model is None or model == self.base:
            return None
        name = model.removeprefix(f"{self.base}:")
        with self._lock:
            entry = self._entries.get(name)
        if entry is None:
            raise APIError(404, f"The model `{model}` does not exist.", "not_found_error", "model")
        return entry.ref

    def next_ref(self, name: str, path: str, pinned: bool = False) -> LoraRef:
        """The ref a load of `name` from `path` will hold once the engine has taken it."""
        if name == self.base or ":" in name:
            raise APIError(
                400, f"invalid adapter name {name!r}", "invalid_request_error", "lora_name"
            )
        with self._lock:
            last = self._revisions.get(name, -1)
        return LoraRef(name, path, last + 1, pinned)

    def put(self, ref: LoraRef) -> None:
        with self._lock:
            self._entries[ref.name] = _Entry(ref, int(time.time()))
            self._revisions[ref.name] = max(ref.revision, self._revisions.get(ref.name, -1))

    def remove(self, name: str) -> LoraRef:
        """Stop serving `name`; the ref it was served by (the engines drop that revision)."""
        with self._lock:
            entry = self._entries.pop(name, None)
        if entry is None:
            raise APIError(
                404, f"The LoRA adapter `{name}` is not loaded.", "not_found_error", "lora_name"
            )
        return entry.ref

    def cards(self, max_model_len: int) -> list[dict]:
        """/v1/models entries of the adapters, `parent` the base model (as vLLM lists them)."""
        with self._lock:
            entries = sorted(self._entries.values(), key=lambda e: e.ref.name)
        return [
            {
                "id": e.ref.name,
                "object": "model",
                "created": e.created,
                "owned_by": "moeserve",
                "root": e.ref.path,
                "parent": self.base,
                "max_model_len": max_model_len,
            }
            for e in entries
        ]
