"""build_engine: the one place that picks an engine's expert executor and shared-prefix connector.

The engine takes both as arguments (it imports neither the kernels' expert loading policy nor
the Redis tier, and knows none of its settings); this factory decides them: in-process experts
unless an executor is given (remote expert shards), the Redis connector when `kv_store` is given.
"""

from __future__ import annotations

from serve_app.engine.async_engine import AsyncLLMEngine
from serve_app.engine.config import EngineConfig
from serve_app.engine.engine import LLMEngine
from serve_app.experts.local import LocalExperts
from serve_app.experts.weights import load_expert_weights
from serve_app.kvstore.connector import RedisConnectorFactory
from serve_app.kvstore.settings import KVStoreConfig
from serve_app.model.expert_executor import ExpertExecutor
from serve_app.platform.device import resolve_device, resolve_dtype


def build_engine(
    config: EngineConfig,
    experts: ExpertExecutor | None = None,
    kv_store: KVStoreConfig | None = None,
) -> LLMEngine:
    """An engine over `experts` (None: every expert in this process, from the checkpoint),
    sharing its prefix cache through the Redis tier `kv_store` (None: local cache only)."""
    if experts is None:
        device = resolve_device(config.device)
        experts = LocalExperts(
            load_expert_weights(config.model, device, resolve_dtype(config.dtype, device))
        )
    connector = None if kv_store is None else RedisConnectorFactory(kv_store)
    return LLMEngine(config, experts, connector)


def build_async_engine(
    config: EngineConfig,
    experts: ExpertExecutor | None = None,
    ttft_window_s: float = 60.0,
    kv_store: KVStoreConfig | None = None,
) -> AsyncLLMEngine:
    """build_engine on the engine's own thread (model load included); returns when ready."""
    return AsyncLLMEngine(lambda: build_engine(config, experts, kv_store), ttft_window_s)
