"""SharedPrefixCache: the Redis tier as the engine's KVConnector (serve_app/engine/kv_connector.py).

Scheduler side: match() says how many blocks after the local prefix-cache hit are in Redis,
having already fetched and validated them (bounded by the tier's timeouts), so a failure is
just a shorter match and never a half-loaded block. Block events go to the write policy
(write_policy.py), which picks the blocks to send. Worker side: load() copies matched blocks
into the blocks the scheduler allocated, before the step runs; save() copies the blocks the
policy picked out of the paged cache after the step and queues them for Redis.
Torch lives here and in ModelRunner.{read,write}_blocks; Redis and bytes in RedisKVTier.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np
import torch

from serve_app.engine.model_runner import ModelRunner
from serve_app.engine.request import Request
from serve_app.engine.scheduler import ExternalLoad
from serve_app.kvstore.codec import KVLayout
from serve_app.kvstore.embedded import EmbeddedRedis, state_dir
from serve_app.kvstore.redis_tier import RedisKVTier
from serve_app.kvstore.settings import KVStoreConfig
from serve_app.kvstore.stats import KVStoreStats
from serve_app.kvstore.write_policy import WritePolicy, make_write_policy
from serve_app.platform.transfer import to_host

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(slots=True)
class _Match:
    request_id: str
    start: int  # first block index (after the local hit)
    blocks: list[np.ndarray]  # [L, 2, B, H, D] each


class SharedPrefixCache:
    """Owns the tier, its write policy and its access to the engine's KV pool (the runner)."""

    def __init__(
        self,
        tier: RedisKVTier,
        runner: ModelRunner,
        embedded: EmbeddedRedis | None,
        policy: WritePolicy,
    ):
        self.tier = tier
        self.runner = runner
        self.block_size = runner.block_size
        self.embedded = embedded
        self.policy = policy
        # the block events of the engine's KV cache manager (serve_app/engine/block_events.py)
        self.block_computed = policy.block_computed
        self.block_loaded = policy.block_loaded
        self.block_reused = policy.block_reused
        self.block_evicted = policy.block_evicted
        self.cache_reset = policy.cache_reset
        self._last: _Match | None = None  # the head request's match, kept if not admitted
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    # ---- scheduler side ---------------------------------------------------------------------

    def match(self, request: Request, num_local_blocks: int) -> tuple[int, object]:
        """(blocks after the local hit that Redis holds, a handle for load()).

        The last prompt token is never matched: its logits are needed."""
        last = self._last
        if last is not None and last.request_id == request.request_id:
            if last.start == num_local_blocks:
                return len(last.blocks), last
        max_blocks = (request.num_tokens - 1) // self.block_size
        hashes = request.block_hashes[num_local_blocks:max_blocks]
        if not hashes:
            return 0, None
        self.num_queried_tokens += len(hashes) * self.block_size
        n = self.tier.lookup(hashes)
        blocks = self.tier.fetch(hashes[:n]) if n else []
        self._last = _Match(request.request_id, num_local_blocks, blocks) if blocks else None
        return len(blocks), self._last

    # ---- engine side ------------------------------------------------------------------------

    def load(self, loads: list[ExternalLoad]) -> None:
        """Copy matched blocks into their allocated cache blocks (before the step runs)."""
        for load in loads:
            m: _Match = load.handle
            n = len(load.block_ids)
            arr = np.stack(m.blocks[:n])  # [n, L, 2, B, H, D]
            if arr.dtype == np.uint16:  # bfloat16 bits
                kv = torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
            else:
                kv = torch.from_numpy(arr)
            self.runner.write_blocks(load.block_ids, kv)
            self.num_hit_tokens += n * self.block_size
            if m is self._last:
                self._last = None

    def save(self) -> None:
        """After the step: queue the blocks the write policy picked; never waits on Redis.
        NOTE: called every step, even with nothing to send: it drives the tier's reconnect."""
        self.publish(self.policy.take_writes())

    def discard(self) -> None:
        self.policy.discard()

    def publish(self, new_blocks: list[tuple[int, bytes]]) -> None:
        """Queue blocks (block id, hash) whose K/V the last step wrote, as room allows (the
        rest are dropped and counted)."""
        n = self.tier.publish_room(len(new_blocks))
        if n == 0:
            return
        new_blocks = new_blocks[:n]
        kv = self.runner.read_blocks([b for b, _ in new_blocks])  # [n, L, 2, B, H, D]
        if self.tier.config.int8:
            kv = kv.float()
        elif kv.dtype == torch.bfloat16:
            kv = kv.view(torch.int16)
        arr = to_host(kv).numpy()
        if arr.dtype == np.int16:
            arr = arr.view(np.uint16)
        self.tier.publish([(h, arr[i]) for i, (_, h) in enumerate(new_blocks)])

    def stats(self) -> KVStoreStats:
        return dataclasses.replace(self.tier.stats(), embedded=self.embedded is not None)

    def close(self) -> None:
        self.tier.close()
        if self.embedded is not None:
            self.embedded.close()


def open_shared_prefix_cache(
    config: KVStoreConfig, runner: ModelRunner, namespace: str
) -> SharedPrefixCache:
    """The tier for this engine: config.url, or the node's embedded redis-server."""
    layout = kv_layout(runner)
    embedded = None
    if config.url is None:
        state = state_dir(config.embedded_dir, config.embedded_owner, os.getpid())
        embedded = EmbeddedRedis(state, config.embedded_maxmemory_mb)
        url_provider = embedded.url
    else:
        url = config.url
        url_provider = lambda: url  # noqa: E731
    tier = RedisKVTier(url_provider, namespace, layout, config)
    policy = make_write_policy(config.write_policy, config.publish_decode)
    return SharedPrefixCache(tier, runner, embedded, policy)


@dataclass(frozen=True, slots=True)
class RedisConnectorFactory:
    """The engine's KVConnectorFactory for the Redis tier (build_engine passes it in)."""

    config: KVStoreConfig

    def kv_dtype(self, dtype: str) -> str:
        return "int8" if self.config.int8 else dtype

    def __call__(self, runner: ModelRunner, namespace: str) -> SharedPrefixCache:
        return open_shared_prefix_cache(self.config, runner, namespace)


def kv_layout(runner: ModelRunner) -> KVLayout:
    """The shared-tier layout of the runner's cache (its KVFormat: K/V or MLA latent rows)."""
    fmt = runner.model.spec.kv_format
    k = runner.kv_caches[0][0]
    return KVLayout(
        len(runner.kv_caches),
        k.shape[1],
        fmt.heads,
        fmt.dim,
        _dtype(k.dtype),
        parts=fmt.parts,
        segments=fmt.segments if len(fmt.segments) > 1 else (),
    )


def _dtype(dtype: torch.dtype) -> str:
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"the shared KV cache does not support KV dtype {dtype}")
    return _DTYPE_NAMES[dtype]
