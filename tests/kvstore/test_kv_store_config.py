"""Config of the shared prefix cache: engine-side ValueErrors, user-side mapping and env."""

from __future__ import annotations

import pytest

from serve_app.config import AppConfig
from serve_app.engine.config import EngineConfig, KVStoreConfig
from serve_app.kvstore.redis_tier import _redact


@pytest.mark.parametrize(
    "kwargs",
    [
        {"url": "http://localhost:6379"},
        {"key_prefix": ""},
        {"key_prefix": "a b"},
        {"lookup_timeout_ms": 0},
        {"load_timeout_ms": -1},
        {"publish_queue_size": 0},
        {"ttl_s": 0},
        {"embedded_maxmemory_mb": 0},
        {"write_policy": "write_back"},
    ],
)
def test_kv_store_config_refuses_nonsense(kwargs):
    with pytest.raises(ValueError):
        KVStoreConfig(**kwargs)


def test_shared_cache_needs_local_prefix_caching():
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        EngineConfig(model="m", enable_prefix_caching=False, kv_store=KVStoreConfig())


def test_app_config_maps_prefix_cache_and_reads_url_from_env(monkeypatch):
    monkeypatch.delenv("MOESERVE_REDIS_URL", raising=False)
    cfg = AppConfig.model_validate(
        {
            "model": "m",
            "prefix_cache": {
                "int8": True,
                "lookup_timeout_ms": 5,
                "ttl_s": 60,
                "write_policy": "write_through_selective",
            },
        }
    ).engine_config()
    assert cfg.kv_store == KVStoreConfig(
        url=None, int8=True, lookup_timeout_ms=5, ttl_s=60, write_policy="write_through_selective"
    )

    # the router passes its app's owner (its Ray node) for the embedded server's state
    owned = AppConfig(model="m").engine_config(embedded_owner="ray-ab12").kv_store
    assert owned.embedded_owner == "ray-ab12" and owned.url is None

    monkeypatch.setenv("MOESERVE_REDIS_URL", "rediss://:s3cret@cache:6380/1")
    assert AppConfig(model="m").engine_config().kv_store.url == "rediss://:s3cret@cache:6380/1"
    explicit = AppConfig.model_validate({"model": "m", "prefix_cache": {"redis_url": "redis://x"}})
    assert explicit.engine_config().kv_store.url == "redis://x"

    assert (
        AppConfig.model_validate({"model": "m", "prefix_cache": {"enabled": False}})
        .engine_config()
        .kv_store
        is None
    )
    no_local = AppConfig.model_validate({"model": "m", "engine": {"enable_prefix_caching": False}})
    assert no_local.engine_config().kv_store is None
    with pytest.raises(ValueError):
        AppConfig.model_validate({"model": "m", "prefix_cache": {"lookup_timeout": 5}})


def test_password_is_redacted_in_logs():
    assert _redact("rediss://:s3cret@cache:6380/1") == "rediss://:***@cache:6380/1"
    assert _redact("redis://user:pw@h:1/0") == "redis://user:***@h:1/0"
    assert _redact("redis://h:1/0") == "redis://h:1/0"
