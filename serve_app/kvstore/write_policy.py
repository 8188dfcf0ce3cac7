"""Write policies of the shared prefix tier: which of the engine's block events send a block.

Pure (no torch, no Redis): the connector forwards the KV cache manager's block events here and,
after each step, sends what take_writes() returns. A policy also remembers which blocks are in
the tier already (written, queued, offered and dropped, or loaded from it), so none goes twice
while it keeps its hash; an evicted block (its hash forgotten) starts over.
Names after SGLang HiCache's --hicache-write-policy.
"""

from __future__ import annotations


class WritePolicy:
    """The bookkeeping every policy shares; subclasses decide on computed and reused blocks.

    publish_decode False never writes a block that holds generated tokens (LMCache's
    `save_decode_cache: False`) when it is computed."""

    name = ""

    def __init__(self, publish_decode: bool = False):
        self.publish_decode = publish_decode
        self._shared: set[int] = set()  # block ids whose K/V is (or was offered to) the tier
        self._writes: list[tuple[int, bytes]] = []

    # ---- block events (serve_app/engine/block_events.py) ------------------------------------

    def block_computed(self, block_id: int, block_hash: bytes, holds_output: bool) -> None:
        pass

    def block_loaded(self, block_id: int, block_hash: bytes) -> None:
        self._shared.add(block_id)

    def block_reused(self, block_id: int, block_hash: bytes) -> None:
        pass

    def block_evicted(self, block_id: int) -> None:
        self._shared.discard(block_id)

    def cache_reset(self) -> None:
        self._shared.clear()
        self._writes.clear()

    # ---- the connector's side ---------------------------------------------------------------

    def take_writes(self) -> list[tuple[int, bytes]]:
        """(block id, hash) to send, in event order; their K/V is written by the step that
        follows the event, so the connector reads them after that step."""
        out, self._writes = self._writes, []
        return out

    def discard(self) -> None:
        """A step failed: its blocks may hold half-written K/V, send none of them."""
        self._writes.clear()

    def _write(self, block_id: int, block_hash: bytes) -> None:
        if block_id not in self._shared:
            self._shared.add(block_id)
            self._writes.append((block_id, block_hash))


class WriteThrough(WritePolicy):
    """Send a block when this engine computes it (prompt blocks; generated ones with
    publish_decode)."""

    name = "write_through"

    def block_computed(self, block_id: int, block_hash: bytes, holds_output: bool) -> None:
        if not holds_output or self.publish_decode:
            self._write(block_id, block_hash)


class WriteThroughSelective(WritePolicy):
    """Send a block only when a later request of this engine reuses it from the local cache
    (HiRadixCache's write_through_threshold 2), whatever tokens it holds: prompts seen once
    cost the tier nothing but a lookup. The reusing request holds the block through the step
    after which the connector reads it."""

    name = "write_through_selective"

    def block_reused(self, block_id: int, block_hash: bytes) -> None:
        self._write(block_id, block_hash)


POLICIES: dict[str, type[WritePolicy]] = {p.name: p for p in (WriteThrough, WriteThroughSelective)}


def make_write_policy(name: str, publish_decode: bool) -> WritePolicy:
    """The policy named by KVStoreConfig.write_policy (already checked against POLICIES)."""
    return POLICIES[name](publish_decode)
