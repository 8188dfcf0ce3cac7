"""EngineStats: the engine's cumulative counters, snapshotted after every step (metrics,
/health, autoscaling signals read them without touching the engine)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    prefix_queried_tokens: int  # local prefix cache
    prefix_hit_tokens: int
    num_preemptions: int
    prefix_remote_queried_tokens: int = 0  # the shared-prefix connector, after the local hit
    prefix_remote_hit_tokens: int = 0
    kv_store: Any = None  # the connector's stats() (kvstore.stats.KVStoreStats)
    expert_tokens: tuple[int, ...] = ()  # tokens routed to each expert id, all MoE layers
    kv_format: str = ""  # KVFormat.tag(): what a block holds (MHA K/V or MLA latent rows)
    kv_block_bytes: int = 0  # bytes of one block in the pool, all layers
    kv_dtype: str = ""  # what the pool holds: "float32", "bfloat16" (engine.dtype bfloat16)
    weight_bytes: int = 0  # the replica's weights as held, in-process experts included
    quantization: str = "none"  # Quantization.tag() of those weights
    kv_lora_blocks: int = 0  # blocks the KV pool gave up to the LoRA adapters' reserve
    lora_resident: int = 0  # LoRA adapters held
    lora_loads: int = 0  # cumulative, from disk and from the host tier
    lora_host_loads: int = 0  # of which from the host tier (no disk read)
    lora_evictions: int = 0
    lora_max: int = 0  # the most held at once (max_loras)
    lora_running: tuple[str, ...] = ()  # adapters of running requests
    lora_waiting: tuple[str, ...] = ()  # adapters of waiting requests
    lora_resident_bytes: int = 0
    lora_budget_bytes: int | None = None  # the resident adapters' budget (None: none)
    lora_host: int = 0  # evicted adapters kept in host memory
    lora_host_bytes: int = 0
    lora_pinned: tuple[str, ...] = ()
