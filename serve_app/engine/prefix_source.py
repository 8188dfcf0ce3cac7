"""The engine's seam for a shared prefix cache (the Redis tier of serve_app/kvstore/).

The engine never builds one itself: it is given a PrefixSourceFactory (by build_engine in
serve_app/runtime/factory.py), called once the KV pool exists, so the engine imports no Redis.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from serve_app.engine.model_runner import ModelRunner
from serve_app.engine.scheduler import ExternalLoad, ExternalPrefixSource


class SharedPrefixSource(ExternalPrefixSource, Protocol):
    """Matched by the scheduler after the local prefix hit; the engine fills the matched blocks
    (load) before the step and offers every newly computed full block (publish) after it."""

    num_queried_tokens: int
    num_hit_tokens: int

    def load(self, loads: list[ExternalLoad]) -> None: ...

    def publish(self, new_blocks: list[tuple[int, bytes]]) -> None: ...

    def stats(self) -> Any:
        """A dataclass snapshot of the source's counters (EngineStats.kv_store, /health)."""
        ...

    def close(self) -> None: ...


# (the engine's model runner: its KV pool, the model digest: the cache's namespace) -> source
PrefixSourceFactory = Callable[[ModelRunner, str], SharedPrefixSource]
