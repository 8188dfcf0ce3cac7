"""build_engine: the one factory of a router replica's engine.

It loads the model spec once for the process (or takes the caller's) and passes it down, picks
the expert executor (in-process experts unless one is given: remote expert shards) and the
shared-prefix connector (the Redis tier when `kv_store` is given), builds the engine's parts
(engine/parts.py: model, KV sizing, runner, connector) and hands them to the LLMEngine loop.
The engine imports neither the kernels' expert loading policy nor the Redis tier.
"""

from __future__ import annotations

from serve_app.engine.async_engine import AsyncLLMEngine
from serve_app.engine.config import EngineConfig
from serve_app.engine.engine import LLMEngine
from serve_app.engine.parts import build_parts, quantization
from serve_app.experts.local import LocalExperts
from serve_app.experts.weights import load_expert_weights
from serve_app.kvstore.connector import RedisConnectorFactory
from serve_app.kvstore.settings import KVStoreConfig
from serve_app.model.config import ModelSpec, load_model_spec
from serve_app.model.expert_executor import ExpertExecutor
from serve_app.model.quant.precision import precision
from serve_app.platform.device import resolve_device, resolve_dtype


def build_engine(
    config: EngineConfig,
    experts: ExpertExecutor | None = None,
    kv_store: KVStoreConfig | None = None,
    spec: ModelSpec | None = None,
) -> LLMEngine:
    """An engine over `experts` (None: every expert in this process, from the checkpoint),
    sharing its prefix cache through the Redis tier `kv_store` (None: local cache only).
    spec: the model's, when the caller already loaded it (None: read here, once)."""
    spec = spec or load_model_spec(config.model)
    if experts is None:
        device = resolve_device(config.device)
        prec = precision(resolve_dtype(config.dtype, device), device, quantization(config))
        dtype, quant = prec.compute, prec.weights
        experts = LocalExperts(
            load_expert_weights(config.model, device, dtype, spec=spec, quant=quant)
        )
    connector = None if kv_store is None else RedisConnectorFactory(kv_store)
    return LLMEngine(build_parts(config, spec, experts, connector))


def build_async_engine(
    config: EngineConfig,
    experts: ExpertExecutor | None = None,
    ttft_window_s: float = 60.0,
    kv_store: KVStoreConfig | None = None,
    spec: ModelSpec | None = None,
) -> AsyncLLMEngine:
    """build_engine on the engine's own thread (model load included); returns when ready."""
    return AsyncLLMEngine(lambda: build_engine(config, experts, kv_store, spec), ttft_window_s)
