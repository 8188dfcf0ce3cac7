"""BenchConfig: the knobs every system under test is given, so they run on equal terms."""

from __future__ import annotations

from dataclasses import dataclass

BENCH_DTYPES = ("float32", "bfloat16")


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
    # Float dtype of moeserve's and transformers' weights and activations, and vLLM's --dtype
    # unless vllm_dtype names another (vLLM on CPU cannot quantize at load: it runs the
    # checkpoint at a float dtype, or a pre-quantized checkpoint as is).
    dtype: str = "float32"
    vllm_dtype: str | None = None  # None: dtype

    @property
    def vllm_float_dtype(self) -> str:
        return self.vllm_dtype or self.dtype

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
        for name in ("dtype", "vllm_dtype"):
            value = getattr(self, name)
            if value is not None and value not in BENCH_DTYPES:
                raise ValueError(f"{name} must be one of {'|'.join(BENCH_DTYPES)}, got {value!r}")
