"""BlockEvents: what the KV cache manager tells a listener about its cached blocks.

The listener is a shared-prefix connector (serve_app/engine/kv_connector.py); the block manager
only emits, it holds no policy. Every event names a block that has a hash (a full block in the
prefix cache); none is sent when no listener is given. No torch.
"""

from __future__ import annotations

from typing import Protocol


class BlockEvents(Protocol):
    def block_computed(self, block_id: int, block_hash: bytes, holds_output: bool) -> None:
        """The block became full with K/V this engine computes in the coming step (cached at
        allocation); holds_output: some of its tokens are generated, not all prompt."""
        ...

    def block_loaded(self, block_id: int, block_hash: bytes) -> None:
        """The block became full with K/V the connector matched (load() fills it)."""
        ...

    def block_reused(self, block_id: int, block_hash: bytes) -> None:
        """A request took the cached block as a prefix-cache hit (it holds the block at least
        through the coming step)."""
        ...

    def block_evicted(self, block_id: int) -> None:
        """The block's hash is forgotten: it is reallocated for other tokens."""
        ...

    def cache_reset(self) -> None:
        """Every hash is forgotten (the prefix cache was reset)."""
        ...
