"""Engine-internal configuration: a frozen dataclass that refuses nonsense with ValueError."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Knobs of one engine instance (one router replica).

    num_kv_blocks None sizes the pool from kv_cache_memory_gb (CPU) or free device memory
    times gpu_memory_utilization (CUDA). max_model_len None takes the model's own limit.
    """

    model: str
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_gb: float = 1.0
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    prefix_hash_seed: int = 0
    max_waiting_requests: int = 4096
    # Torch intra-op threads of the engine thread; None leaves torch's default.
    num_threads: int | None = None
    # Split a step into this many micro-batches when experts are remote (ping-pong overlap).
    num_micro_batches: int = 2

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError(f"num_kv_blocks must be >= 2, got {self.num_kv_blocks}")
        if self.kv_cache_memory_gb <= 0:
            raise ValueError("kv_cache_memory_gb must be positive")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < self.block_size:
            raise ValueError("max_num_batched_tokens must be >= block_size")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto|float32|bfloat16|float16, got {self.dtype!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.num_micro_batches not in (1, 2):
            raise ValueError(f"num_micro_batches must be 1 or 2, got {self.num_micro_batches}")
        if self.max_waiting_requests < 1:
            raise ValueError("max_waiting_requests must be >= 1")
