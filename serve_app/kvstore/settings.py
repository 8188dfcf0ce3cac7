"""The shared prefix tier's settings (the connector's, not the engine's): one frozen dataclass
that refuses nonsense with ConfigError.

NOTE: this is the one definition of every shared-prefix-cache setting (default and bounds);
serve_app/config.py's PrefixCacheSettings takes its defaults from here (`default_of`) and
validates by building it. Stdlib only: the CLI imports WRITE_POLICIES for `--help`.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from serve_app.engine.config import require
from serve_app.kvstore.write_policy import POLICIES

_KV_STORE_SCHEMES = ("redis", "rediss", "unix")
# When a computed block goes to the shared tier: at once, or on its first reuse by this engine.
WRITE_POLICIES = tuple(POLICIES)


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
    write_policy: str = "write_through"  # one of WRITE_POLICIES (write_policy.py)
    ttl_s: int | None = None
    embedded_maxmemory_mb: int = 1024
    embedded_dir: str | None = None
    embedded_owner: str | None = None  # the app (a Ray cluster's node: the Router sets it)

    def __post_init__(self) -> None:
        scheme = urlsplit(self.url).scheme if self.url is not None else None
        require(
            scheme is None or scheme in _KV_STORE_SCHEMES,
            "url",
            f"must start with redis://, rediss:// or unix://, got {scheme or 'no'} scheme",
        )
        require(
            bool(self.key_prefix) and not any(c.isspace() for c in self.key_prefix),
            "key_prefix",
            f"must be non-empty without spaces, got {self.key_prefix!r}",
        )
        require(
            0 < self.lookup_timeout_ms <= 10_000,
            "lookup_timeout_ms",
            f"must be in (0, 10000], got {self.lookup_timeout_ms}",
        )
        require(
            0 < self.load_timeout_ms <= 60_000,
            "load_timeout_ms",
            f"must be in (0, 60000], got {self.load_timeout_ms}",
        )
        require(
            self.publish_queue_size >= 1,
            "publish_queue_size",
            f"must be >= 1, got {self.publish_queue_size}",
        )
        require(
            self.write_policy in WRITE_POLICIES,
            "write_policy",
            f"must be one of {', '.join(WRITE_POLICIES)}, got {self.write_policy!r}",
        )
        require(
            self.ttl_s is None or self.ttl_s >= 1,
            "ttl_s",
            f"must be >= 1 (or null), got {self.ttl_s}",
        )
        require(
            self.embedded_maxmemory_mb >= 1,
            "embedded_maxmemory_mb",
            f"must be >= 1, got {self.embedded_maxmemory_mb}",
        )
