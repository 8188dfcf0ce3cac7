"""KV-pool size: an explicit block count, or a memory budget (CPU GiB or free GPU memory)
less the LoRA adapters' reserve (serve_app/lora/memory.py)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from serve_app.engine.config import EngineConfig


class KVPoolSize(NamedTuple):
    blocks: int
    lora_blocks: int  # blocks the pool gave up to the adapters' reserve (0: explicit count)


def kv_memory(config: EngineConfig, device: torch.device) -> float | None:
    """Bytes for the pool: fixed GiB on CPU, free memory x utilisation on GPU; None when the
    config gives an explicit block count."""
    if config.num_kv_blocks is not None:
        return None
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return gpu_kv_budget(free, total, config.gpu_memory_utilization)
    return config.kv_cache_memory_gb * (1 << 30)


def num_kv_blocks(
    config: EngineConfig, memory: float | None, block_bytes: int, lora_reserve: int = 0
) -> KVPoolSize:
    """Explicit count, else `memory` (kv_memory) less `lora_reserve` bytes in blocks: adapters
    are budgeted against the pool, not on top of it. An explicit count is taken as it is (the
    operator sized the pool; the registry still keeps the adapters within their budget)."""
    if memory is None:
        return KVPoolSize(config.num_kv_blocks, 0)
    whole = int(memory // block_bytes)
    n = int((memory - lora_reserve) // block_bytes)
    if n < 2:
        lora = f" after the LoRA reserve of {lora_reserve} bytes" if lora_reserve else ""
        raise ValueError(
            f"KV cache budget fits only {max(n, 0)} blocks{lora}; give it more memory"
            + (" or lower lora.max_lora_memory_gb" if lora else "")
        )
    return KVPoolSize(n, whole - n)


def gpu_kv_budget(free: int, total: int, utilization: float) -> float:
    """Bytes for the KV pool, measured after the weights are loaded (vLLM's
    gpu_memory_utilization): this process may use `utilization` of the whole device, so the
    pool gets what is free minus the (1 - utilization) share kept for others and activations.

    NOTE: step activations are not profiled; the kept share is their headroom.
    """
    return free - total * (1.0 - utilization)
