"""One factory builds a replica's engine: the model spec read once and passed down."""

from __future__ import annotations

import pytest

import serve_app.model.config as model_config
from serve_app.engine.config import ConfigError, EngineConfig
from serve_app.engine.parts import build_parts
from serve_app.experts.local import LocalExperts
from serve_app.runtime import factory


def test_build_engine_reads_the_model_spec_once(qwen3_tiny, monkeypatch):
    """From config.json once (or never, when the caller passes the spec), whatever the model,
    the experts and the KV sizing need of it."""
    reads = []
    real = model_config.load_model_spec

    def counting(model_dir):
        reads.append(model_dir)
        return real(model_dir)

    monkeypatch.setattr(model_config, "load_model_spec", counting)
    for module in ("serve_app.model.loader", "serve_app.experts.weights", factory.__name__):
        monkeypatch.setattr(f"{module}.load_model_spec", counting)
    config = EngineConfig(model=str(qwen3_tiny), num_kv_blocks=8, max_model_len=64)
    engine = factory.build_engine(config)
    assert reads == [str(qwen3_tiny)]
    assert engine.spec == real(qwen3_tiny) and engine.max_model_len == 64
    assert engine.runner is not None and engine.kv.pool.num_blocks == engine.num_kv_blocks == 8
    again = factory.build_engine(config, spec=engine.spec)
    assert reads == [str(qwen3_tiny)] and again.model_digest == engine.model_digest
    engine.close()
    again.close()


class _Connector:
    def kv_dtype(self, dtype: str) -> str:
        return "int8"

    def __call__(self, runner, namespace):
        raise AssertionError("never opened without the local prefix cache")


def test_parts_refuse_a_connector_without_prefix_caching(qwen3_tiny):
    config = EngineConfig(model=str(qwen3_tiny), num_kv_blocks=8, enable_prefix_caching=False)
    spec = model_config.load_model_spec(qwen3_tiny)
    with pytest.raises(ConfigError, match="enable_prefix_caching"):
        build_parts(config, spec, LocalExperts({}), _Connector())
