"""compressed-tensors checkpoints (`quant_method: compressed-tensors`, as llm-compressor
writes them; field names from compressed-tensors' `pack_quantized` / `int_quantized`
compressors and vLLM's `compressed_tensors` scheme loaders).

`config_groups` give the weights' quantization args (`num_bits`, `type`, `symmetric`,
`strategy`, `group_size`); `format` how they are stored:
- `pack-quantized` (W4A16): `weight_packed` int32 [N, K / 8], 8 4-bit values a word along K,
  lowest bits first, each stored as q + 8 (q signed in [-8, 7]); `weight_scale` [N, K / G];
  `weight_shape` [2] = (N, K). Symmetric: w = q * s, so our Int4Weight holds the stored
  unsigned value with zero = 0, exactly;
- `int-quantized` / `naive-quantized` (int8): `weight` int8 [N, K], `weight_scale` [N, 1]
  (channel) or [1] (tensor): Int8Weight, exactly. Only the weights are used: a checkpoint that
  also quantizes activations (W8A8) runs float activations here.
Refused: other formats (float-quantized, marlin-24, sparse ones), asymmetric weights, 4 bits
other than in groups of 32 / 64 / 128, 8 bits other than per channel or per tensor, several
config groups with different weight args.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from serve_app.model.quant.formats.base import CheckpointFormat, check_group, unpack_int32
from serve_app.model.quant.scheme import Int4Weight, Int8Weight, QuantizationError

FORMATS = ("pack-quantized", "int-quantized", "naive-quantized")


class CompressedTensorsFormat(CheckpointFormat):
    method = "compressed-tensors"

    def __init__(self, config: Mapping) -> None:
        groups = list((config.get("config_groups") or {}).values())
        args = [g.get("weights") for g in groups]
        if not args or any(a != args[0] for a in args) or args[0] is None:
            raise QuantizationError(
                "compressed-tensors checkpoint: needs config groups with the same weight args"
            )
        w = args[0]
        fmt = config.get("format") or groups[0].get("format")
        if fmt not in FORMATS:
            raise QuantizationError(
                f"compressed-tensors checkpoint: format {fmt!r} is not supported "
                f"({', '.join(FORMATS)})"
            )
        bits, strategy = int(w.get("num_bits", 0)), w.get("strategy")
        if w.get("type", "int") != "int" or not w.get("symmetric", True):
            raise QuantizationError(
                f"compressed-tensors checkpoint: {w.get('type')} weights with symmetric "
                f"{w.get('symmetric')} are not supported (symmetric int)"
            )
        if fmt == "pack-quantized" and bits == 4 and strategy == "group":
            self.scheme, self.group = "int4", check_group(self.method, int(w.get("group_size")))
            self.marker, self.suffixes = (
                "weight_packed",
                ("weight_packed", "weight_scale", "weight_shape"),
            )
        elif fmt != "pack-quantized" and bits == 8 and strategy in ("channel", "tensor"):
            self.scheme, self.group = "int8", None
            self.marker = "weight_scale"
            self.suffixes = ("weight", "weight_scale", "weight_zero_point")
        else:
            raise QuantizationError(
                f"compressed-tensors checkpoint: {fmt} with {bits} bits per {strategy} is not "
                "supported (pack-quantized 4 bits per group, int-quantized 8 bits per channel)"
            )
        self.fmt = fmt

    def tag(self) -> str:
        return f"compressed-{super().tag().removeprefix(self.method + '-')}"

    def load(self, t: Mapping[str, torch.Tensor], name: str) -> Int4Weight | Int8Weight:
        if self.scheme == "int4":
            q = unpack_int32(t["weight_packed"], 4, 1)  # [N, K (padded to 8)]
            n, k = (int(v) for v in t["weight_shape"].tolist()) if "weight_shape" in t else q.shape
            s = t["weight_scale"].float()
            return Int4Weight(q[:n, :k].contiguous(), s, torch.zeros_like(s), self.group)
        q, s = t["weight"], t["weight_scale"].float().reshape(-1)
        if q.dtype != torch.int8:
            raise QuantizationError(f"compressed-tensors checkpoint: {name} is {q.dtype}, not int8")
        zp = t.get("weight_zero_point")
        if zp is not None and bool(zp.any()):
            raise QuantizationError(
                f"compressed-tensors checkpoint: {name} has zero points: not supported"
            )
        return Int8Weight(q.contiguous(), s.expand(q.shape[0]).contiguous())
