"""The adapters an engine can serve, by name: loaded from PEFT directories, checked against the
base checkpoint and against what the model applies, and fitted to the model's row order.

What the model applies comes from the model itself (`targets`: module name -> the row order
its weight was loaded in, None when unchanged): every linear of the decoder layers and the MoE
gates. MLA's `kv_b_proj` is not a target (it runs split into the absorbed W_UK / W_UV), nor
are the embeddings and the LM head; an adapter for any of them is refused with one line, as is
expert LoRA where the experts are not in this process (the expert shards hold no adapters yet).
"""

from __future__ import annotations

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
        experts_in_process: bool,
    ):
        self.shapes = shapes
        self.targets = targets
        self.max_rank = max_rank
        self.experts_in_process = experts_in_process
        self._adapters: dict[str, LoraAdapter] = {}

    def load(self, name: str, path: str | Path) -> LoraAdapter:
        """Load (or reload, replacing the old weights) adapter `name`; LoraError if it cannot
        be served, in which case what was loaded under `name` before stays."""
        adapter = load_adapter(name, path, self.shapes, self.max_rank)
        linears: dict[str, LoraWeights] = {}
        for module, w in adapter.linears.items():
            if module not in self.targets:
                raise LoraError(f"LoRA adapter {path}: LoRA on {module} is not supported")
            order = self.targets[module]
            linears[module] = w if order is None else LoraWeights(w.a, w.b[order].contiguous())
        if adapter.experts and not self.experts_in_process:
            raise LoraError(
                f"LoRA adapter {path}: expert LoRA needs the experts in this process "
                "(expert shard actors hold no adapters yet)"
            )
        adapter = replace(adapter, linears=linears)
        self._adapters[name] = adapter
        return adapter

    def unload(self, name: str) -> bool:
        return self._adapters.pop(name, None) is not None

    def get(self, name: str) -> LoraAdapter | None:
        return self._adapters.get(name)

    def names(self) -> list[str]:
        return sorted(self._adapters)
