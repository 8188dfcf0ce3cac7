"""What `engine.dtype` means for the compute and for the weights, decided once at load.

On the CPU, `bfloat16` is a weight format: the decoder linears, the routed and shared experts
and the LM head hold bf16 (half of float32's bytes: decode streams every weight once a step, so
its speed follows the bytes), and the quantized kernel widens them to float32 in registers
(csrc/quant_mm.c; avx512_bf16's vdpbf16ps where the CPU has it), accumulating in float32. The
paged KV cache (K/V, or MLA's latent rows) holds bf16 too: rows are rounded when written and
widened as the attention kernels read them (csrc/kv_elem.h), so a block takes half the bytes and
the same memory budget holds twice the blocks. The activations between layers, the norms and
attention's arithmetic stay float32: the CPU kernels take float32, and torch's bf16 ops on a CPU
without AMX ran the whole model 8-28x slower than float32 (docs/quantization.md). Elsewhere
(CUDA, no C compiler, a weight quantization chosen) the dtype is the compute dtype, weights and
KV cache alike, as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from serve_app.kernels import quant as quant_kernel
from serve_app.model.quant.methods import BF16
from serve_app.model.quant.scheme import Quantization


@dataclass(frozen=True, slots=True)
class Precision:
    compute: torch.dtype  # activations, norms, attention's arithmetic
    weights: Quantization  # how the linears and experts hold their weights
    kv: torch.dtype  # what the paged KV cache holds (read widened to `compute`)


def precision(dtype: torch.dtype, device: torch.device, quant: Quantization) -> Precision:
    """The engine's (or an expert shard's) compute dtype and weight format for `dtype`."""
    if (
        dtype == torch.bfloat16
        and device.type == "cpu"
        and not quant.enabled
        and quant_kernel.load() is not None
    ):
        return Precision(torch.float32, Quantization(BF16), torch.bfloat16)
    return Precision(dtype, quant, dtype)
