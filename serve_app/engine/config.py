"""Engine-internal configuration: a frozen dataclass that refuses nonsense with ValueError."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

_KV_STORE_SCHEMES = ("redis", "rediss", "unix")


@dataclass(frozen=True, slots=True)
class KVStoreConfig:
    """The shared (Redis) tier of the prefix cache, one per engine.

    url None starts (or reuses) an embedded redis-server on a free loopback port of this node,
    capped at embedded_maxmemory_mb with allkeys-lru; state in embedded_dir (None: a per-user
    temp dir). A lookup never waits more than lookup_timeout_ms, a fetch of the hits more than
    load_timeout_ms; past that the blocks are computed locally. publish_queue_size bounds the
    blocks waiting to be sent (more are dropped and counted). ttl_s None keeps entries until
    Redis evicts them (LRU); otherwise every write and hit sets the TTL.
    """

    url: str | None = None
    key_prefix: str = "moeserve:kv"
    lookup_timeout_ms: float = 10.0
    load_timeout_ms: float = 2000.0
    publish_queue_size: int = 1024
    int8: bool = False
    ttl_s: int | None = None
    embedded_maxmemory_mb: int = 1024
    embedded_dir: str | None = None

    def __post_init__(self) -> None:
        if self.url is not None and urlsplit(self.url).scheme not in _KV_STORE_SCHEMES:
            raise ValueError("kv store url must start with redis://, rediss:// or unix://")
        if not self.key_prefix or any(c.isspace() for c in self.key_prefix):
            raise ValueError(f"key_prefix must be non-empty without spaces: {self.key_prefix!r}")
        if not 0 < self.lookup_timeout_ms <= 10_000:
            raise ValueError(f"lookup_timeout_ms must be in (0, 10000]: {self.lookup_timeout_ms}")
        if not 0 < self.load_timeout_ms <= 60_000:
            raise ValueError(f"load_timeout_ms must be in (0, 60000]: {self.load_timeout_ms}")
        if self.publish_queue_size < 1:
            raise ValueError("publish_queue_size must be >= 1")
        if self.ttl_s is not None and self.ttl_s < 1:
            raise ValueError("ttl_s must be >= 1 second (or None)")
        if self.embedded_maxmemory_mb < 1:
            raise ValueError("embedded_maxmemory_mb must be >= 1")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Knobs of one engine instance (one router replica).

    num_kv_blocks None sizes the pool from kv_cache_memory_gb (CPU) or free device memory
    times gpu_memory_utilization (CUDA). max_model_len None takes the model's own limit.
    """

    model: str
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_gb: float = 1.0
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    prefix_hash_seed: int = 0
    max_waiting_requests: int = 4096
    # Torch intra-op threads of the engine thread; None leaves torch's default.
    num_threads: int | None = None
    # Split a step into this many micro-batches when experts are remote (ping-pong overlap).
    num_micro_batches: int = 2
    kv_store: KVStoreConfig | None = None

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError(f"num_kv_blocks must be >= 2, got {self.num_kv_blocks}")
        if self.kv_cache_memory_gb <= 0:
            raise ValueError("kv_cache_memory_gb must be positive")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < self.block_size:
            raise ValueError("max_num_batched_tokens must be >= block_size")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto|float32|bfloat16|float16, got {self.dtype!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.num_micro_batches not in (1, 2):
            raise ValueError(f"num_micro_batches must be 1 or 2, got {self.num_micro_batches}")
        if self.max_waiting_requests < 1:
            raise ValueError("max_waiting_requests must be >= 1")
        if self.kv_store is not None and not self.enable_prefix_caching:
            raise ValueError("kv_store (shared prefix cache) needs enable_prefix_caching")
