"""The KV pool's dtype: bfloat16 under the CPU's `engine.dtype: bfloat16` (bf16 weights, float32
compute), so a block takes half the bytes and the same memory budget holds twice the blocks;
/health and the model digest say which. Greedy and log-probability parity of such an engine:
tests/model/test_bf16_parity.py; the kernels: tests/kernels/test_bf16_kv_attention.py."""

from __future__ import annotations

import json

import pytest
import torch

from serve_app.engine.async_engine import AsyncLLMEngine
from serve_app.engine.config import EngineConfig
from serve_app.engine.kv_budget import kv_memory, num_kv_blocks
from serve_app.engine.model_runner import kv_block_bytes
from serve_app.model.config import load_model_spec
from serve_app.model.quant.precision import precision
from serve_app.model.quant.scheme import Quantization
from serve_app.runtime.factory import build_engine

CPU = torch.device("cpu")
BUDGET_GB = 3 / 1024  # 3 MiB: a few hundred tiny blocks


def test_the_same_budget_holds_twice_the_bf16_blocks(qwen3_tiny):
    """Pure sizing: half the bytes per block, twice the blocks for one budget."""
    spec = load_model_spec(str(qwen3_tiny))
    config = EngineConfig(model=str(qwen3_tiny), kv_cache_memory_gb=BUDGET_GB)
    fp32 = kv_block_bytes(spec, 16, torch.float32)
    bf16 = kv_block_bytes(spec, 16, torch.bfloat16)
    assert fp32 == 2 * bf16 == spec.kv_format.elements_per_token(spec.num_layers) * 16 * 4
    memory = kv_memory(config, CPU)
    assert (
        num_kv_blocks(config, memory, bf16).blocks == 2 * num_kv_blocks(config, memory, fp32).blocks
    )


def test_precision_puts_the_kv_cache_in_bf16_only_with_bf16_weights():
    bf16 = precision(torch.bfloat16, CPU, Quantization())
    if bf16.weights.method != "bf16":
        pytest.skip("no C compiler here: bfloat16 stays torch's bf16 compute, KV included")
    assert (bf16.compute, bf16.kv) == (torch.float32, torch.bfloat16)
    assert precision(torch.float32, CPU, Quantization()).kv == torch.float32
    # int8 weights with bfloat16: torch's bf16 compute, whose KV cache is bf16 as well
    int8 = precision(torch.bfloat16, CPU, Quantization("int8"))
    assert int8.compute == int8.kv == torch.bfloat16


def test_bf16_engine_pool_health_and_digest(qwen3_tiny):
    """Built by the budget: a bf16 engine's pool holds bf16 blocks, twice as many, and says so
    in /health's kv_cache; its digest (the prefix cache namespace) differs from float32's."""
    engines = {
        dtype: build_engine(
            EngineConfig(model=str(qwen3_tiny), dtype=dtype, kv_cache_memory_gb=BUDGET_GB)
        )
        for dtype in ("float32", "bfloat16")
    }
    try:
        fp32, bf16 = engines["float32"], engines["bfloat16"]
        if bf16.runner.kv_caches[0][0].dtype != torch.bfloat16:
            pytest.skip("no C compiler here: no bf16 weight format")
        assert fp32.runner.kv_caches[0][0].dtype == torch.float32
        assert bf16.num_kv_blocks == 2 * fp32.num_kv_blocks
        assert bf16.kv_block_bytes * 2 == fp32.kv_block_bytes
        assert bf16.model_digest != fp32.model_digest
        for engine, name in ((fp32, "float32"), (bf16, "bfloat16")):
            view = AsyncLLMEngine.__new__(AsyncLLMEngine)  # only the health() view, no thread
            view.dead_error, view._stats, view.engine = None, engine.stats(), engine
            kv = json.loads(json.dumps(view.health()))["kv_cache"]
            assert kv["dtype"] == name and kv["block_bytes"] == engine.kv_block_bytes
            assert kv["format"] == engine.spec.kv_format.tag()
    finally:
        for engine in engines.values():
            engine.close()
