"""Quantized dense linears, one module per scheme, swapped in for nn.Linear once at load.

Both run torch's weight-only CPU ops (what torchao's Int8WeightOnlyConfig and
Int4WeightOnlyConfig with Int4CPULayout call): `aten._weight_int8pack_mm` (int8 [N, K] and
per-channel scales) and `aten._weight_int4pack_mm_for_cpu` over the packing of
`aten._convert_weight_to_int4pack_for_cpu` (scales and zeros per group). Elsewhere (CUDA) or
where the op does not take the shape (int4 wants N % 16 == 0), forward dequantizes the weight
and runs F.linear: slower, same numbers.
Shapes: T tokens, K input features, N output features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from serve_app.model.quant.methods import quantizes
from serve_app.model.quant.scheme import Int4Weight, Int8Weight, Quantization, quantize


class QuantLinear(nn.Module):
    """A linear whose weight is stored quantized; forward(x [..., K]) -> [..., N] in x's dtype."""

    in_features: int
    out_features: int
    bias: torch.Tensor | None

    def dequantized(self) -> torch.Tensor:
        """The float [N, K] weight this linear computes with (for tests and fallbacks)."""
        raise NotImplementedError

    def _fallback(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized().to(x.dtype), self.bias)


class Int8Linear(QuantLinear):
    def __init__(self, w: Int8Weight, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = w.q.shape
        self.register_buffer("q", w.q.contiguous())
        self.register_buffer("scale", w.scale.to(dtype))
        self.register_buffer("bias", bias)
        self.cpu_op = w.q.device.type == "cpu"

    def dequantized(self) -> torch.Tensor:
        return Int8Weight(self.q, self.scale.float()).dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cpu_op:
            return self._fallback(x)
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features), self.q, self.scale)
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], self.out_features)


class Int4Linear(QuantLinear):
    def __init__(self, w: Int4Weight, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = w.q.shape
        self.group = w.group
        self.register_buffer("bias", bias)
        self.cpu_op = w.q.device.type == "cpu" and self.out_features % 16 == 0
        if self.cpu_op:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w.q.to(torch.int32), 1)
            self.register_buffer("packed", packed)
            # [K / group, N, 2]: scale and zero of each (group, output)
            sz = torch.stack([w.scale, w.zero], -1).transpose(0, 1).contiguous()
            self.register_buffer("scales_and_zeros", sz.to(dtype))
        else:
            self.register_buffer("q", w.q)
            self.register_buffer("scale", w.scale)
            self.register_buffer("zero", w.zero)

    def dequantized(self) -> torch.Tensor:
        if not self.cpu_op:
            return Int4Weight(self.q, self.scale, self.zero, self.group).dequantize()
        # the op itself on the identity gives back the dequantized columns
        eye = torch.eye(self.in_features, dtype=self.scales_and_zeros.dtype)
        return self._op(eye).t().float()

    def _op(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2, self.packed, self.group, self.scales_and_zeros
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cpu_op:
            return self._fallback(x)
        y = self._op(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], self.out_features)


_LINEARS: dict[str, type[Int8Linear] | type[Int4Linear]] = {"int8": Int8Linear, "int4": Int4Linear}


def quantize_linears(model: nn.Module, quant: Quantization) -> None:
    """Replace every nn.Linear of `model` whose weight `quantizes` (by checkpoint name) with
    the scheme's module. QuantizationError (one line naming the weight) if one cannot be."""
    if not quant.enabled:
        return
    cls = _LINEARS[quant.method]
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if type(m) is nn.Linear and quantizes(f"{name}.weight")
    ]
    for name, m in targets:
        parent_name, _, attr = name.rpartition(".")
        w = quantize(m.weight, quant, f"{name}.weight")
        bias = None if m.bias is None else m.bias.detach()
        setattr(model.get_submodule(parent_name), attr, cls(w, bias, m.weight.dtype))


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as held (quantized linears at their stored size)."""
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    held = sum(b.nbytes for m in quantized for b in m.buffers(recurse=False))
    return sum(p.nbytes for p in model.parameters()) + held
