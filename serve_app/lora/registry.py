"""The adapters an engine holds, by name: loaded from PEFT directories, checked against the
base checkpoint and against what the model applies, fitted to the model's row order, and kept
up to `max_loras` (least recently used evicted first).

What the model applies comes from the model itself (`targets`: module name -> the row order
its weight was loaded in, None when unchanged): every linear of the decoder layers and the MoE
gates. MLA's `kv_b_proj` is not a target (it runs split into the absorbed W_UK / W_UV), nor
are the embeddings and the LM head; an adapter for any of them is refused with one line.
Routed-expert LoRA is applied where the experts run: in this process (serve_app.experts.local),
or on the expert shard actors, which load their experts' slices of the adapter from the same
path on first sight (serve_app.experts.shard_lora); a router over remote experts then keeps
only which layers the adapter's expert LoRA covers (`experts_elsewhere`), not the factors.

A request names its adapter with a `LoraRef` (name, path, revision): an adapter not held, or
held at another revision, is loaded from the path then (a replica that started after the
adapter was registered, or one that evicted it, loads it on its first request). Evicting one
that running requests use is safe: each request keeps its own reference to the weights.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import torch

from serve_app.lora.peft_format import BaseShapes, LoraAdapter, LoraError, LoraWeights, load_adapter


class LoraRegistry:
    def __init__(
        self,
        shapes: BaseShapes,
        targets: dict[str, torch.Tensor | None],
        max_rank: int,
        max_loras: int = 8,
        experts_in_process: bool = True,
    ):
        self.shapes = shapes
        self.targets = targets
        self.max_rank = max_rank
        self.max_loras = max_loras
        self.experts_in_process = experts_in_process
        self._held: OrderedDict[str, tuple[int, str, LoraAdapter]] = OrderedDict()
        self._lock = threading.Lock()  # requests are prepared on the caller's thread
        self.num_loads = 0
        self.num_evictions = 0

    def resolve(self, name: str, path: str = "", revision: int = 0) -> LoraAdapter:
        """The adapter `name` at `revision`, loaded from `path` if not held at it (LoraError
        when it cannot be served; an empty path means it must be held already)."""
        with self._lock:
            held = self._held.get(name)
            # a held revision at least as new serves (a request routed before a reload must not
            # load the older weights back)
            if held is not None and (not path or held[0] >= revision):
                self._held.move_to_end(name)
                return held[2]
        if not path:
            raise LoraError(f"LoRA adapter {name!r} is not loaded")
        return self.load(name, path, revision)

    def load(self, name: str, path: str | Path, revision: int = 0) -> LoraAdapter:
        """Load (or reload) `name` from `path` whatever is held; what was held stays if the
        new one is refused. Reading the files happens outside the lock."""
        adapter = self._fit(load_adapter(name, path, self.shapes, self.max_rank))
        with self._lock:
            self._held[name] = (revision, str(path), adapter)
            self._held.move_to_end(name)
            self.num_loads += 1
            while len(self._held) > self.max_loras:
                self._held.popitem(last=False)
                self.num_evictions += 1
        return adapter

    def unload(self, name: str) -> bool:
        with self._lock:
            return self._held.pop(name, None) is not None

    def get(self, name: str) -> LoraAdapter | None:
        with self._lock:
            held = self._held.get(name)
            return None if held is None else held[2]

    def names(self) -> list[str]:
        with self._lock:
            return list(self._held)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(a.nbytes for _, _, a in self._held.values())

    def _fit(self, adapter: LoraAdapter) -> LoraAdapter:
        """Refuse what the model does not apply; permute B rows to the model's row order."""
        linears: dict[str, LoraWeights] = {}
        for module, w in adapter.linears.items():
            if module not in self.targets:
                raise LoraError(f"LoRA adapter {adapter.path}: LoRA on {module} is not supported")
            order = self.targets[module]
            linears[module] = w if order is None else LoraWeights(w.a, w.b[order].contiguous())
        if not self.experts_in_process:  # the shards hold (and apply) their experts' slices
            return replace(
                adapter, linears=linears, experts={}, experts_elsewhere=frozenset(adapter.experts)
            )
        return replace(adapter, linears=linears)
