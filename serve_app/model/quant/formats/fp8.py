"""DeepSeek-V3's FP8-block checkpoints (`quant_method: fp8`, `weight_block_size: [bn, bk]`),
as DeepSeek's `fp8_cast_bf16.py` / `weight_dequant` and vLLM's `fp8.py` read them.

Per linear: `weight` float8_e4m3fn [N, K] and `weight_scale_inv` fp32 [ceil(N / bn),
ceil(K / bk)]: w = weight * scale_inv of its (bn x bk) block. No scheme of ours is fp8, so the
weights are dequantized at load to float (exact: an fp8 value times an fp32 scale, in fp32),
and the configured quantization applies to them as to a float checkpoint (`int8`
re-quantizes them per channel). Refused: fp8 without `weight_block_size` (per tensor), e5m2.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from serve_app.model.quant.formats.base import CheckpointFormat, Reader
from serve_app.model.quant.scheme import QuantizationError


class FP8BlockFormat(CheckpointFormat):
    method = "fp8"
    scheme = "none"
    marker = "weight_scale_inv"
    suffixes = ("weight", "weight_scale_inv")

    def __init__(self, config: Mapping) -> None:
        block = config.get("weight_block_size")
        fmt = config.get("fmt", "e4m3")
        if not block or len(block) != 2 or fmt != "e4m3":
            raise QuantizationError(
                f"fp8 checkpoint: weight_block_size {block} / fmt {fmt!r} is not supported "
                "(e4m3 with a [rows, cols] block)"
            )
        self.block = (int(block[0]), int(block[1]))

    def tag(self) -> str:
        return f"fp8-block{self.block[0]}x{self.block[1]}"

    def shape(self, shapes: Mapping[str, tuple[int, ...]], read: Reader) -> tuple[int, int]:
        n, k = shapes["weight"]
        return n, k

    def load(self, t: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
        w, s = t["weight"], t["weight_scale_inv"].float()
        n, k = w.shape
        bn, bk = self.block
        if s.shape != ((n + bn - 1) // bn, (k + bk - 1) // bk):
            raise QuantizationError(
                f"fp8 checkpoint: {name} has weight_scale_inv {tuple(s.shape)}, not one per "
                f"{bn}x{bk} block of {n}x{k}"
            )
        full = s.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
        return w.float() * full
