"""Per-request block tables on top of the BlockPool, with automatic prefix caching. No torch."""

from __future__ import annotations

from typing import NamedTuple

from serve_app.engine.block_events import BlockEvents
from serve_app.engine.block_hash import extend_block_hashes
from serve_app.engine.block_pool import BlockPool, KVCacheBlock
from serve_app.engine.request import Request


class ComputedBlocks(NamedTuple):
    """Prefix-cache hit: the cached blocks and how many tokens they cover."""

    blocks: list[KVCacheBlock]
    num_tokens: int


NO_HIT = ComputedBlocks([], 0)


class KVCacheManager:
    """Allocates and frees the blocks of each request and publishes its full blocks for reuse.

    events (a shared-prefix connector, or None) hears of every block cached (computed here or
    loaded by the connector), reused as a hit, evicted, and of resets; it decides what follows.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        root_hash: bytes,
        enable_caching: bool = True,
        events: BlockEvents | None = None,
    ):
        self.block_size = block_size
        self.root_hash = root_hash
        self.enable_caching = enable_caching
        self.events = events
        self.pool = BlockPool(num_blocks, enable_caching, events)
        self.req_blocks: dict[str, list[KVCacheBlock]] = {}
        self._num_published: dict[str, int] = {}
        # Cumulative prefix-cache counters (tokens), exported as metrics.
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def update_block_hashes(self, request: Request) -> None:
        """Hash the request's newly completed full blocks (prompt and generated tokens)."""
        if self.enable_caching:
            extend_block_hashes(
                request.block_hashes,
                request.all_token_ids,
                self.block_size,
                request.hash_root or self.root_hash,
            )

    def get_computed_blocks(self, request: Request) -> ComputedBlocks:
        """Longest run of cached full blocks from the start of the request's tokens.

        The last token is never a hit: its logits are needed to sample the next token.
        """
        if not self.enable_caching:
            return NO_HIT
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVCacheBlock] = []
        for h in request.block_hashes[:max_blocks]:
            block = self.pool.get_cached_block(h)
            if block is None:
                break
            hits.append(block)
        self.num_queried_tokens += request.num_tokens
        self.num_hit_tokens += len(hits) * self.block_size
        return ComputedBlocks(hits, len(hits) * self.block_size)

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        hit: ComputedBlocks = NO_HIT,
        num_external_tokens: int = 0,
    ) -> list[KVCacheBlock] | None:
        """Reserve blocks for num_new_tokens more tokens after the computed ones (and the hit).

        Returns the new blocks, or None when the pool cannot fit them (the caller preempts).
        Blocks that become full with these tokens are published to the prefix cache right away:
        the model writes every token's K/V before any attention reads, so a later request in the
        same step may already share them. The first num_external_tokens of the new tokens (whole
        blocks) are loaded by the connector, not computed: their event says so. Every hit block
        is told reused: this request holds it through the step after which a connector reads it.
        """
        blocks = self.req_blocks.setdefault(request.request_id, [])
        num_total = request.num_computed_tokens + hit.num_tokens + num_new_tokens
        num_needed = -(-num_total // self.block_size) - len(blocks) - len(hit.blocks)
        # Hit blocks with ref_cnt 0 sit in the free queue: taking them shrinks what is free.
        num_idle_hits = sum(1 for b in hit.blocks if b.ref_cnt == 0)
        if num_needed > self.pool.num_free_blocks - num_idle_hits:
            if not blocks:
                del self.req_blocks[request.request_id]
            return None
        self.pool.touch(hit.blocks)
        if self.events is not None:
            for b in hit.blocks:
                self.events.block_reused(b.block_id, b.block_hash)
        blocks.extend(hit.blocks)
        new_blocks = self.pool.allocate(max(num_needed, 0))
        blocks.extend(new_blocks)
        first_new = len(blocks) - len(new_blocks)
        loaded = range(first_new, first_new + num_external_tokens // self.block_size)
        self._publish(request, blocks, num_total, loaded)
        return new_blocks

    def _publish(
        self, request: Request, blocks: list[KVCacheBlock], num_tokens: int, loaded: range
    ) -> None:
        """Cache the request's blocks that are full once num_tokens have K/V, a block that
        became full only now included (the tail block of an earlier prefill chunk or decode
        step), and tell events of each: computed here, or `loaded` by the connector."""
        if not self.enable_caching:
            return
        start = self._num_published.get(request.request_id, 0)
        end = min(num_tokens // self.block_size, len(request.block_hashes))
        prompt_end = request.num_prompt_tokens // self.block_size
        events = self.events
        for i in range(start, end):
            h = request.block_hashes[i]
            if not self.pool.cache_block(blocks[i], h) or events is None:
                continue
            if i in loaded:
                events.block_loaded(blocks[i].block_id, h)
            else:
                events.block_computed(blocks[i].block_id, h, i >= prompt_end)
        self._num_published[request.request_id] = max(start, end)

    def free(self, request: Request) -> None:
        """Return every block of the request (tail first, so its tail is evicted first)."""
        blocks = self.req_blocks.pop(request.request_id, None)
        self._num_published.pop(request.request_id, None)
        if blocks:
            self.pool.free(reversed(blocks))

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, ())]

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()
