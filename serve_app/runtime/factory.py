"""build_engine: the one place that picks an engine's expert executor and prefix source.

The engine takes both as arguments (it imports neither the kernels' expert loading policy nor
Redis); this factory decides them from the config: in-process experts unless an executor is
given (remote expert shards), the shared Redis prefix cache when `config.kv_store` is set.
"""

from __future__ import annotations

from functools import partial

from serve_app.engine.async_engine import AsyncLLMEngine
from serve_app.engine.config import EngineConfig
from serve_app.engine.engine import LLMEngine
from serve_app.experts.local import LocalExperts
from serve_app.experts.weights import load_expert_weights
from serve_app.kvstore.connector import open_shared_prefix_cache
from serve_app.model.expert_executor import ExpertExecutor
from serve_app.platform.device import resolve_device, resolve_dtype


def build_engine(config: EngineConfig, experts: ExpertExecutor | None = None) -> LLMEngine:
    """An engine over `experts` (None: every expert in this process, from the checkpoint)."""
    if experts is None:
        device = resolve_device(config.device)
        experts = LocalExperts(
            load_expert_weights(config.model, device, resolve_dtype(config.dtype, device))
        )
    source = None
    if config.kv_store is not None:
        source = partial(open_shared_prefix_cache, config.kv_store)
    return LLMEngine(config, experts, source)


def build_async_engine(
    config: EngineConfig, experts: ExpertExecutor | None = None, ttft_window_s: float = 60.0
) -> AsyncLLMEngine:
    """build_engine on the engine's own thread (model load included); returns when ready."""
    return AsyncLLMEngine(lambda: build_engine(config, experts), ttft_window_s)
