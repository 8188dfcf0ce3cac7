"""KV-pool size: an explicit block count, or a memory budget (CPU GiB or free GPU memory)."""

from __future__ import annotations

import torch

from serve_app.engine.config import EngineConfig


def num_kv_blocks(config: EngineConfig, device: torch.device, block_bytes: int) -> int:
    """Explicit count, else a memory budget: fixed GiB on CPU, free memory x utilisation on GPU."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = gpu_kv_budget(free, total, config.gpu_memory_utilization)
    else:
        budget = config.kv_cache_memory_gb * (1 << 30)
    n = int(budget // block_bytes)
    if n < 2:
        raise ValueError(f"KV cache budget fits only {n} blocks; give it more memory")
    return n


def gpu_kv_budget(free: int, total: int, utilization: float) -> float:
    """Bytes for the KV pool, measured after the weights are loaded (vLLM's
    gpu_memory_utilization): this process may use `utilization` of the whole device, so the
    pool gets what is free minus the (1 - utilization) share kept for others and activations.

    NOTE: step activations are not profiled; the kept share is their headroom.
    """
    return free - total * (1.0 - utilization)
