"""Config of the shared prefix cache: engine-side ValueErrors, user-side mapping and env."""

from __future__ import annotations

import pytest

from serve_app.config import AppConfig
from serve_app.kvstore.redis_tier import _redact
from serve_app.kvstore.settings import KVStoreConfig


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
    ).kv_store_config()
    assert cfg == KVStoreConfig(
        url=None, int8=True, lookup_timeout_ms=5, ttl_s=60, write_policy="write_through_selective"
    )

    # the router passes its app's owner (its Ray node) for the embedded server's state
    owned = AppConfig(model="m").kv_store_config(embedded_owner="ray-ab12")
    assert owned.embedded_owner == "ray-ab12" and owned.url is None

    monkeypatch.setenv("MOESERVE_REDIS_URL", "rediss://:s3cret@cache:6380/1")
    assert AppConfig(model="m").kv_store_config().url == "rediss://:s3cret@cache:6380/1"
    explicit = AppConfig.model_validate({"model": "m", "prefix_cache": {"redis_url": "redis://x"}})
    assert explicit.kv_store_config().url == "redis://x"

    assert (
        AppConfig.model_validate(
            {"model": "m", "prefix_cache": {"enabled": False}}
        ).kv_store_config()
        is None
    )
    no_local = AppConfig.model_validate({"model": "m", "engine": {"enable_prefix_caching": False}})
    assert no_local.kv_store_config() is None
    with pytest.raises(ValueError):
        AppConfig.model_validate({"model": "m", "prefix_cache": {"lookup_timeout": 5}})


def test_password_is_redacted_in_logs():
    assert _redact("rediss://:s3cret@cache:6380/1") == "rediss://:***@cache:6380/1"
    assert _redact("redis://user:pw@h:1/0") == "redis://user:***@h:1/0"
    assert _redact("redis://h:1/0") == "redis://h:1/0"
