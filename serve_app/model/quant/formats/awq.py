"""AWQ GEMM checkpoints (`quant_method: awq`, `version: gemm`), as AutoAWQ's WQLinear_GEMM
packs them and vLLM's `awq.py` / `awq_triton.py` read them.

Per linear: `qweight` int32 [K, N / 8] and `qzeros` int32 [K / G, N / 8], 8 4-bit values a
word along N in AWQ's interleaved order (word position i holds column [0, 2, 4, 6, 1, 3, 5,
7][i] of its run of 8), `scales` fp16 [K / G, N]; w[n, k] = (q - z) * s. Maps onto
Int4Weight (zero = (8 - z) * s). Refused: other versions (gemv, exllama, ...), bits other
than 4, group sizes other than 32 / 64 / 128, zero_point false.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from serve_app.model.quant.formats.base import (
    CheckpointFormat,
    Reader,
    check_group,
    int4_from_zero_points,
    unpack_int32,
)
from serve_app.model.quant.scheme import Int4Weight, QuantizationError

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


class AWQFormat(CheckpointFormat):
    method = "awq"
    scheme = "int4"
    marker = "qweight"
    suffixes = ("qweight", "qzeros", "scales")

    def __init__(self, config: Mapping) -> None:
        version = str(config.get("version", "gemm")).lower()
        bits = int(config.get("bits", config.get("w_bit", 4)))
        if version != "gemm":
            raise QuantizationError(f"awq checkpoint: version {version!r} is not supported (gemm)")
        if bits != 4:
            raise QuantizationError(f"awq checkpoint: bits {bits} is not supported (4)")
        if not config.get("zero_point", True):
            raise QuantizationError("awq checkpoint: zero_point false is not supported")
        self.group = check_group(
            "awq", int(config.get("group_size", config.get("q_group_size", 128)))
        )

    def shape(self, shapes: Mapping[str, tuple[int, ...]], read: Reader) -> tuple[int, int]:
        k, words = shapes["qweight"]  # [K, N / 8]
        return words * 8, k

    def load(self, t: Mapping[str, torch.Tensor], name: str) -> Int4Weight:
        q = unpack_int32(t["qweight"], 4, 1, AWQ_ORDER).t().contiguous()  # [N, K]
        zeros = unpack_int32(t["qzeros"], 4, 1, AWQ_ORDER).t().contiguous()  # [N, K / G]
        return int4_from_zero_points(q, zeros, t["scales"].t().contiguous(), self.group)
