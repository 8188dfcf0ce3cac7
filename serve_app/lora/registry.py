"""The adapters an engine holds, by name: loaded from PEFT directories, checked against the
base checkpoint and against what the model applies, fitted to the model's row order, and kept
in two tiers (docs/lora.md, "Memory"):

- resident: the fitted form requests run, at most `max_loras` adapters and `max_bytes` bytes
  (the reserve taken out of the KV pool, lora/memory.py), least recently used evicted first;
  a pinned adapter is never evicted (at most max_loras - 1 are, so one slot always turns);
- host: the parsed PEFT factors of adapters evicted from the resident tier, so loading one
  again is a re-fit, not a disk read; up to `max_cpu_loras` adapters in host memory counting
  the resident ones (vLLM's meaning), least recently used dropped first; beyond it, the disk.

What the model applies comes from the model itself (`targets`: module name -> the row order
its weight was loaded in, None when unchanged): every linear of the decoder layers and the MoE
gates (MLA's `kv_b_proj` included: its delta follows the absorbed W_UK / W_UV, mla.py). The
embeddings and the LM head are not; an adapter for either is refused with one line.
Routed-expert LoRA is applied where the experts run: in this process (serve_app.experts.local),
or on the expert shard actors, which load their experts' slices of the adapter from the same
path on first sight (serve_app.experts.shard_lora); a router over remote experts then keeps
only which layers the adapter's expert LoRA covers (`experts_elsewhere`), not the factors.

A request names its adapter with a `LoraRef` (name, path, revision, pinned): an adapter not
resident, or resident at another revision, is taken from the host tier or loaded from the path
then (a replica that started after the adapter was registered, or one that evicted it, loads
it on its first request). Evicting one that running requests use is safe: each request keeps
its own reference to the weights (NOTE: so until they finish, the memory it holds is not
counted in the resident bytes).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch

from serve_app.lora import PIN_REFUSED
from serve_app.lora.peft_format import (
    BaseShapes,
    ExpertLoraWeights,
    LoraAdapter,
    LoraError,
    LoraWeights,
    load_adapter,
)


@dataclass(frozen=True, slots=True)
class LoraLimits:
    """max_bytes None: no byte budget; max_cpu_loras None: 2 x max_loras."""

    max_loras: int = 8
    max_bytes: int | None = None
    max_cpu_loras: int | None = None

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})"
            )

    @property
    def host_capacity(self) -> int:
        return 2 * self.max_loras if self.max_cpu_loras is None else self.max_cpu_loras


class LoraMemory(NamedTuple):
    """A snapshot of the tiers (/health `lora`, metrics)."""

    resident: int
    resident_bytes: int
    budget_bytes: int | None
    host: int  # evicted adapters in host memory (the resident ones not counted)
    host_bytes: int
    pinned: tuple[str, ...]


@dataclass(slots=True)
class _Held:
    revision: int
    path: str
    parsed: LoraAdapter  # as read from disk: what the host tier keeps
    fitted: LoraAdapter | None = None  # resident only: what requests run
    pinned: bool = False
    # counted once at admission (memory() runs every engine step)
    fitted_bytes: int = 0
    parsed_bytes: int = 0


def victims(
    lru: list[tuple[str, int, bool]], max_count: int, max_bytes: int | None, new_bytes: int
) -> list[str] | None:
    """The adapters to evict, least recently used first, so one of `new_bytes` fits: `lru` is
    (name, bytes, pinned) oldest first. None when evicting every unpinned one is not enough."""
    count, total = len(lru), sum(b for _, b, _ in lru)
    out = []
    for name, nbytes, pinned in lru:
        if count + 1 <= max_count and (max_bytes is None or total + new_bytes <= max_bytes):
            break
        if pinned:
            continue
        out.append(name)
        count, total = count - 1, total - nbytes
    if count + 1 > max_count or (max_bytes is not None and total + new_bytes > max_bytes):
        return None
    return out


class LoraRegistry:
    def __init__(
        self,
        shapes: BaseShapes,
        targets: dict[str, torch.Tensor | None],
        max_rank: int,
        experts_in_process: bool,
        limits: LoraLimits | None = None,
        device: torch.device | None = None,
    ):
        """device: where resident factors live, the engine's (on the CPU the fitted factors of
        unpermuted modules are the parsed tensors themselves: no copy)."""
        self.shapes = shapes
        self.device = device or torch.device("cpu")
        self.targets = targets
        self.max_rank = max_rank
        self.experts_in_process = experts_in_process
        self.limits = limits or LoraLimits()
        self._resident: OrderedDict[str, _Held] = OrderedDict()  # oldest first
        self._host: OrderedDict[str, _Held] = OrderedDict()  # evicted, oldest first
        self._lock = threading.Lock()  # requests are prepared on the caller's thread
        self.num_disk_loads = 0
        self.num_host_loads = 0
        self.num_evictions = 0

    @property
    def max_loras(self) -> int:
        return self.limits.max_loras

    @property
    def num_loads(self) -> int:
        return self.num_disk_loads + self.num_host_loads

    def resolve(
        self, name: str, path: str = "", revision: int = 0, pinned: bool = False
    ) -> LoraAdapter:
        """The adapter `name` at `revision`: resident, else re-fitted from the host tier, else
        loaded from `path` (LoraError when it cannot be served; an empty path means it must be
        held already)."""
        with self._lock:
            held = self._resident.get(name)
            # a held revision at least as new serves (a request routed before a reload must not
            # load the older weights back)
            if held is not None and (not path or held.revision >= revision):
                self._resident.move_to_end(name)
                return held.fitted
            host = self._host.get(name)
            if host is not None and (not path or host.revision >= revision):
                return self._admit(name, replace(host, pinned=pinned or host.pinned), "host")
        if not path:
            raise LoraError(f"LoRA adapter {name!r} is not loaded")
        return self.load(name, path, revision, pinned)

    def load(
        self, name: str, path: str | Path, revision: int = 0, pinned: bool = False
    ) -> LoraAdapter:
        """Load (or reload) `name` from `path` whatever is held; what was held stays if the
        new one is refused. Reading the files happens outside the lock."""
        parsed = load_adapter(name, path, self.shapes, self.max_rank)
        with self._lock:
            return self._admit(name, _Held(revision, str(path), parsed, None, pinned), "disk")

    def unload(self, name: str, up_to: int | None = None) -> bool:
        """Drop `name` from both tiers, pinned or not; with `up_to`, only a revision at most
        that (a newer load of the name stays: serve_app/lora/unloads.py)."""
        with self._lock:
            dropped = False
            for tier in (self._resident, self._host):
                held = tier.get(name)
                if held is not None and (up_to is None or held.revision <= up_to):
                    del tier[name]
                    dropped = True
            return dropped

    def get(self, name: str) -> LoraAdapter | None:
        with self._lock:
            held = self._resident.get(name)
            return None if held is None else held.fitted

    def names(self) -> list[str]:
        """The resident adapters, least recently used first."""
        with self._lock:
            return list(self._resident)

    def host_names(self) -> list[str]:
        """The adapters in the host tier only, least recently used first."""
        with self._lock:
            return list(self._host)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(h.fitted_bytes for h in self._resident.values())

    def memory(self) -> LoraMemory:
        with self._lock:
            return LoraMemory(
                resident=len(self._resident),
                resident_bytes=sum(h.fitted_bytes for h in self._resident.values()),
                budget_bytes=self.limits.max_bytes,
                host=len(self._host),
                host_bytes=sum(h.parsed_bytes for h in self._host.values()),
                pinned=tuple(n for n, h in self._resident.items() if h.pinned),
            )

    def _admit(self, name: str, held: _Held, source: str) -> LoraAdapter:
        """Make `held` resident (under the lock): fit it, check the pin and the byte budget,
        evict least recently used unpinned adapters to the host tier until it fits."""
        fitted = self._fit(held.parsed)
        size, limits = fitted.nbytes, self.limits
        if limits.max_bytes is not None and size > limits.max_bytes:
            raise LoraError(
                f"LoRA adapter {name}: {size} bytes do not fit the adapter memory budget of "
                f"{limits.max_bytes} bytes (lora.max_lora_memory_gb, lora.max_loras)"
            )
        others = [(n, h) for n, h in self._resident.items() if n != name]
        n_pinned = sum(h.pinned for _, h in others)
        if held.pinned and n_pinned + 1 > limits.max_loras - 1:
            raise LoraError(
                f"{PIN_REFUSED} LoRA adapter {name}: {n_pinned} adapters are pinned, at most "
                f"max_loras - 1 = {limits.max_loras - 1} may be"
            )
        lru = [(n, h.fitted_bytes, h.pinned) for n, h in others]
        out = victims(lru, limits.max_loras, limits.max_bytes, size)
        if out is None:
            pinned_bytes = sum(b for _, b, p in lru if p)
            raise LoraError(
                f"LoRA adapter {name}: {size} bytes do not fit next to the pinned adapters "
                f"({pinned_bytes} of {limits.max_bytes} bytes)"
            )
        self._resident.pop(name, None)  # a reload replaces the old revision (not kept)
        self._host.pop(name, None)
        for victim in out:
            evicted = self._resident.pop(victim)
            self._host[victim] = replace(evicted, fitted=None, pinned=False)
            self.num_evictions += 1
        parsed_bytes = held.parsed_bytes or held.parsed.nbytes
        self._resident[name] = replace(
            held, fitted=fitted, fitted_bytes=size, parsed_bytes=parsed_bytes
        )
        while self._host and len(self._host) + len(self._resident) > limits.host_capacity:
            self._host.popitem(last=False)
        if source == "host":
            self.num_host_loads += 1
        else:
            self.num_disk_loads += 1
        return fitted

    def _fit(self, adapter: LoraAdapter) -> LoraAdapter:
        """Refuse what the model does not apply; permute B rows to the model's row order."""
        linears: dict[str, LoraWeights] = {}
        dev = self.device
        for module, w in adapter.linears.items():
            if module not in self.targets:
                raise LoraError(f"LoRA adapter {adapter.path}: LoRA on {module} is not supported")
            order = self.targets[module]
            b = w.b if order is None else w.b[order].contiguous()
            linears[module] = LoraWeights(w.a.to(dev), b.to(dev))
        if not self.experts_in_process:  # the shards hold (and apply) their experts' slices
            return replace(
                adapter, linears=linears, experts={}, experts_elsewhere=frozenset(adapter.experts)
            )
        experts = {
            k: ExpertLoraWeights(w.a.to(dev), w.b.to(dev)) for k, w in adapter.experts.items()
        }
        return replace(adapter, linears=linears, experts=experts)
