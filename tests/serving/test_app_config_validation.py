"""The whole app config is checked when it loads (AppConfig, the builder, the CLI), with a
message naming the setting; the user-facing models take defaults and bounds from the engine's
frozen dataclasses (one definition per setting)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from pydantic import ValidationError

from serve_app.config import AppConfig, EngineSettings, PrefixCacheSettings, config_error_line
from serve_app.engine.config import EngineConfig
from serve_app.kvstore.settings import KVStoreConfig

BAD = [
    ({"engine": {"block_size": 3}}, "engine.block_size must be a power of two, got 3"),
    ({"engine": {"max_num_batched_tokens": 8}}, "engine.max_num_batched_tokens must be >= block"),
    ({"engine": {"max_num_seqs": 0}}, "engine.max_num_seqs must be >= 1"),
    ({"engine": {"gpu_memory_utilization": 1.5}}, "engine.gpu_memory_utilization must be in"),
    ({"prefix_cache": {"lookup_timeout_ms": 20000}}, "prefix_cache.lookup_timeout_ms must be in"),
    ({"prefix_cache": {"redis_url": "http://x"}}, "prefix_cache.redis_url must start with redis"),
    ({"prefix_cache": {"key_prefix": "a b"}}, "prefix_cache.key_prefix must be non-empty"),
    ({"prefix_cache": {"ttl_s": 0}}, "prefix_cache.ttl_s must be >= 1"),
    ({"prefix_cache": {"write_policy": "write_back"}}, "write_through_selective"),
]


@pytest.mark.parametrize("section, message", BAD)
def test_app_config_refuses_bad_engine_and_prefix_cache_settings(section, message):
    with pytest.raises(ValidationError) as e:
        AppConfig.model_validate({"model": "m", **section})
    assert message in config_error_line(e.value)


@pytest.mark.parametrize("section, message", BAD[:1] + BAD[4:6])
def test_builder_refuses_them_before_deploying(section, message, qwen3_tiny):
    from serve_app.builder import build_app
    from serve_app.deployments.version_app import build_version_app

    for build in (build_app, build_version_app):
        with pytest.raises(ValueError, match=message.split(" must")[0]):
            build({"model": str(qwen3_tiny), **section})


def test_cli_refuses_them_with_one_line(qwen3_tiny, tmp_path):
    """`moeserve serve --ray` (make run) stops before starting Ray."""
    out = subprocess.run(
        [sys.executable, "-m", "serve_app.cli", "serve", "--model", str(qwen3_tiny), "--ray"]
        + ["--max-num-batched-tokens", "8", "--redis-url", "redis://127.0.0.1:1/0"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "MOESERVE_RUN_DIR": str(tmp_path)},
    )
    assert out.returncode == 2
    lines = [line for line in out.stdout.splitlines() if line.startswith("error:")]
    assert lines == [
        "error: invalid app config: engine.max_num_batched_tokens must be >= block_size (16), got 8"
    ], out.stdout + out.stderr


@pytest.mark.parametrize(
    "model, engine_cls, renames",
    [
        (EngineSettings, EngineConfig, {}),
        (PrefixCacheSettings, KVStoreConfig, {"redis_url": "url"}),
    ],
)
def test_user_defaults_are_the_engine_defaults(model, engine_cls, renames):
    engine_defaults = {f.name: f.default for f in dataclasses.fields(engine_cls)}
    for name, field in model.model_fields.items():
        if name == "enabled":
            continue
        assert field.default == engine_defaults[renames.get(name, name)], name
        # bounds live in the dataclass only: no pydantic constraint restates them
        assert not field.metadata, (name, field.metadata)


def test_valid_settings_reach_the_engine_unchanged():
    config = AppConfig.model_validate(
        {
            "model": "m",
            "engine": {"block_size": 32, "max_num_batched_tokens": 64},
            "prefix_cache": {"redis_url": "redis://h:1/0", "lookup_timeout_ms": 50},
        }
    )
    e = config.engine_config()
    assert (e.block_size, e.max_num_batched_tokens) == (32, 64)
    store = config.kv_store_config()
    assert store.url == "redis://h:1/0" and store.lookup_timeout_ms == 50


@pytest.mark.parametrize(
    "section, message",
    [
        ({"streaming": {"transport": "serve"}}, "streaming.transport was retired"),
        ({"streaming": {"transport": "channel"}}, "streaming.transport was retired"),
        ({"experts": {"transport": "ray"}}, "experts.transport was retired"),
    ],
)
def test_retired_transport_keys_are_refused_with_one_line(section, message):
    """One data path per hop: a config that still names a transport is told so, not ignored."""
    with pytest.raises(ValidationError) as e:
        AppConfig.model_validate({"model": "m", **section})
    line = config_error_line(e.value)
    assert message in line and "remove the key" in line and "\n" not in line
