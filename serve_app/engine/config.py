"""Engine-internal configuration: frozen dataclasses that refuse nonsense with ConfigError.

NOTE: these are the one definition of every engine setting (default and bounds); the shared
prefix cache's are in serve_app/kvstore/settings.py, built the same way. The user-facing
pydantic models (serve_app/config.py) take their defaults from here (`default_of`) and validate
by building these, so a bound is never restated by hand.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from serve_app.model.quant.methods import GROUP_SIZES as QUANT_GROUP_SIZES
from serve_app.model.quant.methods import METHODS as QUANTIZATIONS

DTYPES = ("auto", "float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A setting out of its bounds; `field` is its name in the dataclass that refused it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field} {message}")
        self.field = field
        self.message = message


def require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(field, message)


def default_of(cls: type, name: str) -> Any:
    """The default of a dataclass field (slots dataclasses keep it only in their fields)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default is not dataclasses.MISSING:
        return f.default
    raise KeyError(f"{cls.__name__}.{name} has no default")


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
    dtype: str = "auto"  # one of DTYPES; auto = bf16 on CUDA, fp32 on CPU
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    prefix_hash_seed: int = 0
    max_waiting_requests: int = 4096
    # Torch intra-op threads of the engine thread; None leaves torch's default.
    num_threads: int | None = None
    # Split a step into this many micro-batches when experts are remote (ping-pong overlap).
    num_micro_batches: int = 2
    # Weight-only quantization at load: none | int8 (per channel) | int4 (groups along K).
    # A pre-quantized checkpoint's own scheme is held under none (serve_app/model/quant/formats).
    quantization: str = "none"
    # int4 group size; None = 128, or the largest of 64 / 32 dividing each matrix's K.
    quantization_group_size: int | None = None
    # LoRA adapters loaded at start, (name, PEFT directory) pairs; requests pick one by name.
    lora_adapters: tuple[tuple[str, str], ...] = ()
    max_lora_rank: int = 64  # an adapter of a higher rank is refused at load
    max_loras: int = 8  # adapters held at once (least recently used evicted first)
    # distinct adapters in one step (the base model does not count), fair: engine/lora_cap.py;
    # None: no cap. At most max_loras, so a step's adapters can all be held.
    max_loras_per_batch: int | None = None
    # Adapters in host memory (resident ones included, vLLM's meaning); None: 2 x max_loras.
    max_cpu_loras: int | None = None
    # Resident adapters' byte budget, taken out of the KV pool's; None: with lora_adapters,
    # max_loras x the largest adapter max_lora_rank allows (at most half the pool), without,
    # no budget (lora/memory.py); 0: no adapter fits.
    max_lora_memory_gb: float | None = None
    # Adapters (of lora_adapters) never evicted; at most max_loras - 1.
    lora_pinned: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        b = self.block_size
        require(b >= 1 and not b & (b - 1), "block_size", f"must be a power of two, got {b}")
        require(
            self.num_kv_blocks is None or self.num_kv_blocks >= 2,
            "num_kv_blocks",
            f"must be >= 2 (or null), got {self.num_kv_blocks}",
        )
        require(
            self.kv_cache_memory_gb > 0,
            "kv_cache_memory_gb",
            f"must be positive, got {self.kv_cache_memory_gb}",
        )
        require(
            0.0 < self.gpu_memory_utilization <= 1.0,
            "gpu_memory_utilization",
            f"must be in (0, 1], got {self.gpu_memory_utilization}",
        )
        require(self.max_num_seqs >= 1, "max_num_seqs", f"must be >= 1, got {self.max_num_seqs}")
        require(
            self.max_num_batched_tokens >= b,
            "max_num_batched_tokens",
            f"must be >= block_size ({b}), got {self.max_num_batched_tokens}",
        )
        require(
            self.max_model_len is None or self.max_model_len >= 1,
            "max_model_len",
            f"must be >= 1 (or null), got {self.max_model_len}",
        )
        require(
            self.dtype in DTYPES, "dtype", f"must be one of {'|'.join(DTYPES)}, got {self.dtype!r}"
        )
        require(
            self.num_threads is None or self.num_threads >= 1,
            "num_threads",
            f"must be >= 1, got {self.num_threads}",
        )
        require(
            self.num_micro_batches in (1, 2),
            "num_micro_batches",
            f"must be 1 or 2, got {self.num_micro_batches}",
        )
        require(
            self.quantization in QUANTIZATIONS,
            "quantization",
            f"must be one of {'|'.join(QUANTIZATIONS)}, got {self.quantization!r}",
        )
        require(
            self.quantization_group_size is None
            or self.quantization_group_size in QUANT_GROUP_SIZES,
            "quantization_group_size",
            f"must be one of {QUANT_GROUP_SIZES} (or null), got {self.quantization_group_size}",
        )
        require(self.max_loras >= 1, "max_loras", f"must be >= 1, got {self.max_loras}")
        n = self.max_loras_per_batch
        require(
            n is None or 1 <= n <= self.max_loras,
            "max_loras_per_batch",
            f"must be in [1, max_loras ({self.max_loras})] (or null), got {n}",
        )
        require(self.max_lora_rank >= 1, "max_lora_rank", f"must be >= 1, got {self.max_lora_rank}")
        names = [name for name, _ in self.lora_adapters]
        require(
            len(set(names)) == len(names) and all(names),
            "lora_adapters",
            f"names must be unique and non-empty, got {names}",
        )
        self._check_lora_memory(names)
        require(
            self.max_waiting_requests >= 1,
            "max_waiting_requests",
            f"must be >= 1, got {self.max_waiting_requests}",
        )

    def _check_lora_memory(self, names: list[str]) -> None:
        cpu = self.max_cpu_loras
        require(
            cpu is None or cpu >= self.max_loras,
            "max_cpu_loras",
            f"must be >= max_loras ({self.max_loras}) (or null), got {cpu}",
        )
        gb = self.max_lora_memory_gb
        require(gb is None or gb >= 0, "max_lora_memory_gb", f"must be >= 0 (or null), got {gb}")
        pinned = self.lora_pinned
        require(
            len(pinned) <= self.max_loras - 1,
            "lora_pinned",
            f"pins {len(pinned)} adapters, at most max_loras - 1 = {self.max_loras - 1} may be",
        )
        unknown = sorted(set(pinned) - set(names))
        require(not unknown, "lora_pinned", f"names adapters not loaded at start: {unknown}")
