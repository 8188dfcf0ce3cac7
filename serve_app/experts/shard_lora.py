"""The LoRA adapters an expert shard holds: for each, only the expert slices of its own experts.

A router sends, with each expert call that has adapter rows, the adapters' tags (name, path,
digest: serve_app.experts.wire.AdapterTag). On first sight of one the shard reads it from the
path (the same PEFT directory the router loaded), checks that the digest is the router's (the
files did not change in between: the shard would otherwise apply other weights than the
router's linears), and keeps, per MoE layer and projection, the packed slice of the experts it
owns that the adapter changes (`ExpertLoraWeights.select`): its memory grows with what the
adapter really holds for these experts, not with a dense slot per adapter. Least recently used
adapters are evicted beyond `max_loras`, an unloaded one is dropped when the router replica
that took the unload says so (`drop`); a call keeps references to those it runs.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from serve_app.experts.wire import AdapterTag
from serve_app.lora.peft_format import BaseShapes, LoraAdapter, LoraError, load_adapter

# the routers checked the rank against their max_lora_rank already; the shard does not refuse
_ANY_RANK = 1 << 30


@dataclass(frozen=True, slots=True)
class _Held:
    digest: str
    owned: tuple[int, ...]  # the experts the slices were cut for
    adapter: LoraAdapter


class ShardAdapters:
    """name -> the held adapter's expert slices (LRU, up to max_loras)."""

    def __init__(self, shapes: Callable[[], BaseShapes], device: torch.device, max_loras: int = 8):
        self._shapes = shapes  # read on the first adapter only (a base-model shard never does)
        self._base: BaseShapes | None = None
        self.device = device
        self.max_loras = max_loras
        self._held: OrderedDict[str, _Held] = OrderedDict()
        self._lock = threading.Lock()
        self.num_loads = 0

    def resolve(self, tag: AdapterTag, owned: list[int]) -> LoraAdapter:
        """The adapter `tag` names, sliced to `owned` (loaded now if not held so). ValueError
        when it cannot be loaded or is not the router's (the call is refused)."""
        key = tuple(owned)
        with self._lock:
            held = self._held.get(tag.name)
            # NOTE: slices cut for another expert set (before add_experts / drop_experts) would
            # silently skip a new expert's delta: they are cut again.
            if held is not None and held.digest == tag.digest and held.owned == key:
                self._held.move_to_end(tag.name)
                return held.adapter
        adapter = self._load(tag, owned)
        with self._lock:
            self._held[tag.name] = _Held(tag.digest, key, adapter)
            self._held.move_to_end(tag.name)
            self.num_loads += 1
            while len(self._held) > self.max_loras:
                self._held.popitem(last=False)
        return adapter

    def _load(self, tag: AdapterTag, owned: list[int]) -> LoraAdapter:
        if self._base is None:
            self._base = self._shapes()
        try:
            full = load_adapter(tag.name, tag.path, self._base, _ANY_RANK)
        except LoraError as e:
            raise ValueError(f"expert shard cannot load LoRA adapter {tag.name!r}: {e}") from e
        if full.digest != tag.digest:
            raise ValueError(
                f"LoRA adapter {tag.name!r} at {tag.path} changed since the router loaded it "
                "(digest differs): reload it through the API"
            )
        experts = {}
        for key, w in full.experts.items():
            part = w.select(owned)
            if part is not None:
                experts[key] = type(part)(
                    part.a.to(self.device), part.b.to(self.device), part.index.to(self.device)
                )
        # the linears run on the router: the shard keeps none of them
        return LoraAdapter(full.name, full.path, full.digest, full.rank, {}, experts)

    def drop(self, name: str) -> bool:
        """Forget adapter `name` (an admin unload); a later call naming it loads it again."""
        with self._lock:
            return self._held.pop(name, None) is not None

    def names(self) -> list[str]:
        with self._lock:
            return list(self._held)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(h.adapter.nbytes for h in self._held.values())
