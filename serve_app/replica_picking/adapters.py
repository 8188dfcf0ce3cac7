"""Where each LoRA adapter is resident, as one ingress believes it. Pure: no Ray, no clock.

The belief is this picker's own memory of where it sent each adapter, replayed through the
same LRU the replicas run (serve_app/lora/registry.py: up to max_loras adapters by name, the
least recently used evicted; a held revision at least as new serves). A replica only loads an
adapter for a request naming it, so while this ingress is the replica's only sender the
belief is exact, evictions included.

Why not what the replicas report (Ray Serve's MultiplexMixin reads the model ids replicas
push): a report is up to a stats period old, so the first burst of requests for a new adapter
would all see it resident nowhere and spread it over every replica, each one loading it and
evicting another (the churn that sinks the hit share with 16 adapters on 2 replicas); and
Serve 2.60's routing stats carry no time, so the sends made since a report cannot be told
apart from those it already counts. The memory is right at the very next request.

NOTE: the memory is wrong where other senders touch a replica (another ingress replica, the
admin load route, an unload): an adapter believed resident may have been evicted there. The
cost is one adapter load on that replica (the engine loads on demand from LoraRef.path),
never a failed request.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class AdapterKey:
    """The adapter a request runs: its name and the catalog's revision of it."""

    name: str
    revision: int = 0
    pinned: bool = False  # the replicas never evict it (lora.pinned / "pinned": true)


class AdapterResidency:
    """Per replica, the adapters believed held there: name -> revision, least recent first."""

    def __init__(self, max_loras: int):
        if max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {max_loras}")
        self.max_loras = max_loras
        self._held: dict[str, OrderedDict[str, int]] = {}
        self._pinned: dict[str, set[str]] = {}  # replica -> names it holds pinned

    def holders(self, adapter: AdapterKey) -> set[str]:
        """Replicas that would serve `adapter` without loading it."""
        return {
            r for r, held in self._held.items() if held.get(adapter.name, -1) >= adapter.revision
        }

    def count(self, replica: str) -> int:
        return len(self._held.get(replica, ()))

    def held(self, replica: str) -> list[str]:
        """Names held there, least recently used first."""
        return list(self._held.get(replica, ()))

    def record(self, replica: str, adapter: AdapterKey) -> None:
        """A request running `adapter` was sent to `replica` (it loads it if not held)."""
        held = self._held.setdefault(replica, OrderedDict())
        held[adapter.name] = max(adapter.revision, held.get(adapter.name, -1))
        held.move_to_end(adapter.name)
        if adapter.pinned:
            self._pinned.setdefault(replica, set()).add(adapter.name)
        pins = self._pinned.get(replica, set())
        # the replica's LRU (lora/registry.py): the least recent unpinned one goes first
        unpinned = [n for n in held if n not in pins]
        while len(held) > self.max_loras and unpinned:
            del held[unpinned.pop(0)]

    def retain(self, replicas: Sequence[str]) -> None:
        """Forget replicas that are gone."""
        keep = set(replicas)
        for r in [r for r in self._held if r not in keep]:
            del self._held[r]
            self._pinned.pop(r, None)
