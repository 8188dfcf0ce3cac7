"""compressed-tensors checkpoints (`quant_method: compressed-tensors`, as llm-compressor
writes them; field names from compressed-tensors' `pack_quantized` / `int_quantized`
compressors and vLLM's `compressed_tensors` scheme loaders).

`config_groups` give the weights' quantization args (`num_bits`, `type`, `symmetric`,
`strategy`, `group_size`); `format` how they are stored:
- `pack-quantized` (W4A16, W8A16): `weight_packed` int32 [N, K * bits / 32], values along K
  lowest bits first, each stored as q + 2^(bits - 1) (q signed); `weight_scale` [N, K / G];
  `weight_shape` [2] = (N, K). 4 bits per group, symmetric: w = q * s, so our Int4Weight holds
  the stored unsigned value with zero = 0, exactly; asymmetric: `weight_zero_point` (z + 8,
  packed along N into int32 [N / 8, K / G], or int8 z [N, K / G] unpacked), w = (q - z) * s
  (zero = (8 - (z + 8)) * s, as GPTQ's). 8 bits per channel, symmetric: Int8Weight, exactly;
- `int-quantized` / `naive-quantized` (int8): `weight` int8 [N, K], `weight_scale` [N, 1]
  (channel) or [1] (tensor): Int8Weight, exactly. Only the weights are used: a checkpoint that
  also quantizes activations (W8A8) runs float activations here.
Refused: other formats (float-quantized, marlin-24, sparse ones), 4 bits other than in
groups of 32 / 64 / 128, 8 bits other than symmetric per channel or per tensor, float
weights, several config groups with different weight args.
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
        self.symmetric = bool(w.get("symmetric", True))
        packed = fmt == "pack-quantized"
        if w.get("type", "int") != "int":
            raise QuantizationError(
                f"compressed-tensors checkpoint: {w.get('type')} weights are not supported (int)"
            )
        if packed and bits == 4 and strategy == "group":
            self.scheme, self.group = "int4", check_group(self.method, int(w.get("group_size")))
        elif bits == 8 and strategy in ("channel", "tensor") and self.symmetric:
            self.scheme, self.group = "int8", None
        else:
            sym = "symmetric" if self.symmetric else "asymmetric"
            raise QuantizationError(
                f"compressed-tensors checkpoint: {fmt} {sym} {bits} bits per {strategy} is not "
                "supported (pack-quantized 4 bits per group, 8 bits per channel symmetric)"
            )
        self.bits = bits
        self.marker = "weight_packed" if packed else "weight_scale"
        weight = ("weight_packed", "weight_shape") if packed else ("weight",)
        self.suffixes = (*weight, "weight_scale", "weight_zero_point")

    def tag(self) -> str:
        return f"compressed-{super().tag().removeprefix(self.method + '-')}"

    def shape(self, shapes: Mapping[str, tuple[int, ...]], read: Reader) -> tuple[int, int]:
        if "weight_shape" in shapes:
            n, k = (int(v) for v in read("weight_shape").tolist())
        elif "weight_packed" in shapes:  # no stored shape: K as packed (no padding)
            n, words = shapes["weight_packed"]
            k = words * 32 // self.bits
        else:
            n, k = shapes["weight"]
        return n, k

    def load(self, t: Mapping[str, torch.Tensor], name: str) -> Int4Weight | Int8Weight:
        s = t["weight_scale"].float()
        if "weight_packed" in t:  # stored q + 2^(bits - 1), lowest bits first along K
            u = unpack_int32(t["weight_packed"], self.bits, 1)  # [N, K padded]
            n, k = (int(v) for v in t["weight_shape"].tolist()) if "weight_shape" in t else u.shape
            u = u[:n, :k].contiguous()
        else:
            u = None
        if self.scheme == "int4":
            if self.symmetric:  # w = (u - 8) * s: zero 0, exactly
                return Int4Weight(u, s, torch.zeros_like(s), self.group)
            zp = t["weight_zero_point"]  # int32 [N / 8, K / G] packed along N, or int8 [N, K / G]
            if zp.dtype == torch.int32:
                uz = unpack_int32(zp, 4, 0)[:n]
            else:
                uz = zp.int() + 8
            return int4_from_zero_points(u, uz, s, self.group)  # w = (u - uz) * s
        if u is not None:
            q = (u.int() - 128).to(torch.int8)
        elif t["weight"].dtype == torch.int8:
            q = t["weight"]
        else:
            raise QuantizationError(
                f"compressed-tensors checkpoint: {name} is {t['weight'].dtype}, not int8"
            )
        zp = t.get("weight_zero_point")
        if zp is not None and bool(zp.any()):
            raise QuantizationError(
                f"compressed-tensors checkpoint: {name} has zero points: not supported"
            )
        return Int8Weight(q.contiguous(), s.reshape(-1).expand(q.shape[0]).contiguous())
