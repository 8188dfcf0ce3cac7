"""Engine-internal configuration: frozen dataclasses that refuse nonsense with ConfigError.

NOTE: these are the one definition of every engine and shared-prefix-cache setting (default
and bounds). The user-facing pydantic models (serve_app/config.py) take their defaults from
here (`default_of`) and validate by building these, so a bound is never restated by hand.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

_KV_STORE_SCHEMES = ("redis", "rediss", "unix")
# When a computed block goes to the shared tier (SGLang HiCache's --hicache-write-policy names):
# at once, or on its first reuse by this engine (HiRadixCache's write_through_threshold 2).
WRITE_POLICIES = ("write_through", "write_through_selective")
DTYPES = ("auto", "float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A setting out of its bounds; `field` is its name in the dataclass that refused it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field} {message}")
        self.field = field
        self.message = message


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(field, message)


def default_of(cls: type, name: str) -> Any:
    """The default of a dataclass field (slots dataclasses keep it only in their fields)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default is not dataclasses.MISSING:
        return f.default
    raise KeyError(f"{cls.__name__}.{name} has no default")


@dataclass(frozen=True, slots=True)
class KVStoreConfig:
    """The shared (Redis) tier of the prefix cache, one per engine.

    url None starts (or reuses) an embedded redis-server on a free loopback port of this node,
    capped at embedded_maxmemory_mb with allkeys-lru. It belongs to one app: the engines with
    the same embedded_owner on a node share it (None: this process alone), and its state is in
    <embedded_dir>/<owner> (embedded_dir None: a per-user temp dir). A lookup never waits more
    than lookup_timeout_ms, a fetch of the hits more than load_timeout_ms; past that the blocks
    are computed locally. publish_queue_size bounds the blocks waiting to be sent (more are
    dropped and counted). ttl_s None keeps entries until Redis evicts them (LRU); otherwise
    every write and hit sets the TTL. publish_decode False publishes only blocks wholly inside a
    prompt (LMCache's `save_decode_cache: False`): a generated block is kept in the local prefix
    cache but not sent to Redis. write_policy write_through sends a block when it is computed;
    write_through_selective only when a later request of this engine reuses it from the local
    cache (then whatever it holds, prompt or generated tokens), so prompts seen once cost the
    tier nothing but a lookup.
    """

    url: str | None = None
    key_prefix: str = "moeserve:kv"
    lookup_timeout_ms: float = 10.0
    load_timeout_ms: float = 2000.0
    publish_queue_size: int = 1024
    int8: bool = False
    publish_decode: bool = False
    write_policy: str = "write_through"  # one of WRITE_POLICIES
    ttl_s: int | None = None
    embedded_maxmemory_mb: int = 1024
    embedded_dir: str | None = None
    embedded_owner: str | None = None  # the app (a Ray cluster's node: the Router sets it)

    def __post_init__(self) -> None:
        scheme = urlsplit(self.url).scheme if self.url is not None else None
        _require(
            scheme is None or scheme in _KV_STORE_SCHEMES,
            "url",
            f"must start with redis://, rediss:// or unix://, got {scheme or 'no'} scheme",
        )
        _require(
            bool(self.key_prefix) and not any(c.isspace() for c in self.key_prefix),
            "key_prefix",
            f"must be non-empty without spaces, got {self.key_prefix!r}",
        )
        _require(
            0 < self.lookup_timeout_ms <= 10_000,
            "lookup_timeout_ms",
            f"must be in (0, 10000], got {self.lookup_timeout_ms}",
        )
        _require(
            0 < self.load_timeout_ms <= 60_000,
            "load_timeout_ms",
            f"must be in (0, 60000], got {self.load_timeout_ms}",
        )
        _require(
            self.publish_queue_size >= 1,
            "publish_queue_size",
            f"must be >= 1, got {self.publish_queue_size}",
        )
        _require(
            self.write_policy in WRITE_POLICIES,
            "write_policy",
            f"must be one of {', '.join(WRITE_POLICIES)}, got {self.write_policy!r}",
        )
        _require(
            self.ttl_s is None or self.ttl_s >= 1,
            "ttl_s",
            f"must be >= 1 (or null), got {self.ttl_s}",
        )
        _require(
            self.embedded_maxmemory_mb >= 1,
            "embedded_maxmemory_mb",
            f"must be >= 1, got {self.embedded_maxmemory_mb}",
        )


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
    dtype: str = "auto"  # one of DTYPES; auto = bf16 on CUDA, fp32 on CPU
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    prefix_hash_seed: int = 0
    max_waiting_requests: int = 4096
    # Torch intra-op threads of the engine thread; None leaves torch's default.
    num_threads: int | None = None
    # Split a step into this many micro-batches when experts are remote (ping-pong overlap).
    num_micro_batches: int = 2
    kv_store: KVStoreConfig | None = None

    def __post_init__(self) -> None:
        b = self.block_size
        _require(b >= 1 and not b & (b - 1), "block_size", f"must be a power of two, got {b}")
        _require(
            self.num_kv_blocks is None or self.num_kv_blocks >= 2,
            "num_kv_blocks",
            f"must be >= 2 (or null), got {self.num_kv_blocks}",
        )
        _require(
            self.kv_cache_memory_gb > 0,
            "kv_cache_memory_gb",
            f"must be positive, got {self.kv_cache_memory_gb}",
        )
        _require(
            0.0 < self.gpu_memory_utilization <= 1.0,
            "gpu_memory_utilization",
            f"must be in (0, 1], got {self.gpu_memory_utilization}",
        )
        _require(self.max_num_seqs >= 1, "max_num_seqs", f"must be >= 1, got {self.max_num_seqs}")
        _require(
            self.max_num_batched_tokens >= b,
            "max_num_batched_tokens",
            f"must be >= block_size ({b}), got {self.max_num_batched_tokens}",
        )
        _require(
            self.max_model_len is None or self.max_model_len >= 1,
            "max_model_len",
            f"must be >= 1 (or null), got {self.max_model_len}",
        )
        _require(
            self.dtype in DTYPES, "dtype", f"must be one of {'|'.join(DTYPES)}, got {self.dtype!r}"
        )
        _require(
            self.num_threads is None or self.num_threads >= 1,
            "num_threads",
            f"must be >= 1, got {self.num_threads}",
        )
        _require(
            self.num_micro_batches in (1, 2),
            "num_micro_batches",
            f"must be 1 or 2, got {self.num_micro_batches}",
        )
        _require(
            self.max_waiting_requests >= 1,
            "max_waiting_requests",
            f"must be >= 1, got {self.max_waiting_requests}",
        )
        _require(
            self.kv_store is None or self.enable_prefix_caching,
            "kv_store",
            "(the shared prefix cache) needs enable_prefix_caching",
        )
