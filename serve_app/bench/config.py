"""BenchConfig: the knobs every system under test is given, so they run on equal terms."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """Shared by moeserve and vLLM (scheduler limits) and transformers (static batch size).

    max_model_len bounds both engines' context and is what workloads are fitted to.
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    hf_batch_size: int = 16
    # The warm-up (excluded from timing): a few short prompts that touch prefill and decode.
    warmup_prompts: int = 4
    warmup_input_len: int = 32
    warmup_output_len: int = 8
    warmup_seed: int = 12345
    # moeserve's weight-only quantization (none | int8 | int4) and int4 group size
    quantization: str = "none"
    quantization_group_size: int | None = None
    # moeserve's engine dtype (bfloat16 on the CPU: bf16 weights, float32 compute)
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in (
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_model_len",
            "hf_batch_size",
            "warmup_prompts",
            "warmup_input_len",
            "warmup_output_len",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
