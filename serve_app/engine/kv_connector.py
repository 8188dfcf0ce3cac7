"""The engine's seam for a shared prefix cache: KVConnector and its factory (after vLLM v1's
KV connector, kv_transfer/kv_connector/v1/base.py).

The engine never builds one itself nor knows its settings: build_engine
(serve_app/runtime/factory.py) gives it a KVConnectorFactory, called once the KV pool exists.
The connector then hears the KV cache manager's block events (block_events.py) and owns what
follows from them: its write policy, its settings and its access to the KV pool.
"""

from __future__ import annotations

from typing import Any, Protocol

from serve_app.engine.block_events import BlockEvents
from serve_app.engine.model_runner import ModelRunner
from serve_app.engine.scheduler import ExternalLoad, ExternalPrefixSource


class KVConnector(BlockEvents, ExternalPrefixSource, Protocol):
    """Scheduler side: match() after the local prefix hit (ExternalPrefixSource). Engine side:
    load() fills the matched blocks before the step; save() after the step sends the blocks
    its policy chose from the events; discard() drops them when the step failed."""

    num_queried_tokens: int
    num_hit_tokens: int

    def load(self, loads: list[ExternalLoad]) -> None: ...

    def save(self) -> None: ...

    def discard(self) -> None: ...

    def stats(self) -> Any:
        """A dataclass snapshot of the connector's counters (EngineStats.kv_store, /health)."""
        ...

    def close(self) -> None: ...


class KVConnectorFactory(Protocol):
    def kv_dtype(self, dtype: str) -> str:
        """What a block holds where it is shared, for the model digest (the engine's `dtype`,
        or a compressed form)."""
        ...

    def __call__(self, runner: ModelRunner, namespace: str) -> KVConnector:
        """The connector over this runner's KV pool; namespace: the model digest."""
        ...
