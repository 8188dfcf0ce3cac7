"""Quantized dense linears, one module per scheme, swapped in for nn.Linear once at load.

Each picks its matmul once, when built:
- on the CPU with float32 activations and the kernel built (N a panel multiple): the
  quantized grouped kernel of serve_app/kernels/quant.py over one "expert", the weights
  dequantized in registers. Measured on a 2-core AVX2 EPYC (docs/quantization.md), torch
  2.13's own weight-only ops ran float32 activations 10-30x slower than F.linear, where this
  kernel beats F.linear at decode;
- elsewhere on the CPU (bf16 activations, other N): torch's weight-only ops, as torchao's
  Int8WeightOnlyConfig / Int4WeightOnlyConfig with Int4CPULayout call them:
  `aten._weight_int8pack_mm` (int8 [N, K], per-channel scales) and
  `aten._weight_int4pack_mm_for_cpu` over `aten._convert_weight_to_int4pack_for_cpu`'s packing
  (scales and zeros per group; N % 16 == 0);
- anywhere else (CUDA): the weight dequantized per call, then F.linear.
Shapes: T tokens, K input features, N output features.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from serve_app.model.quant.methods import quantizes
from serve_app.model.quant.scheme import (
    Bf16Weight,
    Int4Weight,
    Int8Weight,
    Quantization,
    QuantWeight,
    quantize,
)
from serve_app.model.quant.stacked import stack


class QuantLinear(nn.Module):
    """A linear whose weight is held quantized; forward(x [..., K]) -> [..., N] in x's dtype.
    `stack`: the weight as a [1, N, K] stack (kernel panels, or as quantized for the dequantizing
    path), or None where the scheme's torch op runs (subclasses implement _torch_op)."""

    def __init__(self, w: QuantWeight, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        lead = w.w if isinstance(w, Bf16Weight) else w.q
        self.out_features, self.in_features = lead.shape
        self.register_buffer("bias", bias)
        self.stack = stack(_one_matrix(w), dtype)
        if not self.stack.packed and lead.device.type == "cpu" and self._op_applies():
            self._prepare_op(w, dtype)
            self.stack = None

    @property
    def path(self) -> str:
        """kernel | torch_op | dequant: how forward multiplies (chosen once, when built)."""
        if self.stack is None:
            return "torch_op"
        return "kernel" if self.stack.packed else "dequant"

    @property
    def weight_bytes(self) -> int:
        held = sum(b.nbytes for b in self.buffers(recurse=False))
        return held + (self.stack.nbytes if self.stack is not None else 0)

    def dequantized(self) -> torch.Tensor:
        """The float32 [N, K] weight this linear computes with."""
        if self.stack is not None:
            return self.stack.dequantized(0)
        # the op on the identity gives the dequantized weight's columns
        eye = torch.eye(self.in_features, dtype=torch.float32)
        return self._torch_op(eye).t().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.stack is None:
            y = self._torch_op(x2)
        else:
            y = self.stack.matmul(x2, [(0, 0, x2.shape[0])])
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def _op_applies(self) -> bool:
        return True

    def _prepare_op(self, w, dtype: torch.dtype) -> None:
        raise NotImplementedError

    def _torch_op(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Int8Linear(QuantLinear):
    def _prepare_op(self, w: Int8Weight, dtype: torch.dtype) -> None:
        self.register_buffer("q", w.q.contiguous())
        self.register_buffer("scale", w.scale.to(dtype))

    def _torch_op(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x2, self.q, self.scale.to(x2.dtype))


class Int4Linear(QuantLinear):
    def _op_applies(self) -> bool:
        return self.out_features % 16 == 0

    def _prepare_op(self, w: Int4Weight, dtype: torch.dtype) -> None:
        self.group = w.group
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w.q.to(torch.int32), 1)
        self.register_buffer("packed", packed)
        # [K / group, N, 2]: scale and zero of each (group, output)
        sz = torch.stack([w.scale, w.zero], -1).transpose(0, 1).contiguous()
        self.register_buffer("scales_and_zeros", sz.to(dtype))

    def _torch_op(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2, self.packed, self.group, self.scales_and_zeros.to(x2.dtype)
        )


class Bf16Linear(QuantLinear):
    """The weight held in bfloat16 (engine.dtype bfloat16 on the CPU: precision.py); float32
    activations through the kernel's bf16 panels, or F.linear on the widened weight."""

    def _op_applies(self) -> bool:
        return False


# first module of a group -> (the members' stacks when fused, the fused stack, bias or None)
_fused: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def project_group(x: torch.Tensor, linears) -> tuple[torch.Tensor, ...] | None:
    """(m(x) for m in linears) as one kernel call, for quantized linears that read the same
    input (q, k and v; gate and up) held in the kernel's panels of one scheme; None where they
    are not. The first call joins their panels into one stack and re-makes each member's as a
    view into it (no second copy); the outputs are column slices of one [T, N] tensor."""
    first = linears[0]
    entry = _fused.get(first)
    held = [getattr(m, "stack", None) for m in linears]  # None: not a kernel-path QuantLinear
    if entry is None or any(h is not s for h, s in zip(held, entry[0], strict=True)):
        entry = _fuse(linears)
        _fused[first] = entry
    if entry[1] is None:
        return None
    _, fused, bias = entry
    x2 = x.reshape(-1, first.in_features)
    y = fused.matmul(x2, [(0, 0, x2.shape[0])])
    if bias is not None:
        y += bias
    y = y.view(*x.shape[:-1], fused.out_features)
    return tuple(y.split([m.out_features for m in linears], dim=-1))


def _fuse(linears) -> tuple:
    stacks = [getattr(m, "stack", None) for m in linears]
    lead = stacks[0]
    joinable = all(isinstance(m, QuantLinear) for m in linears) and all(
        s is not None
        and s.packed
        and type(s) is type(lead)
        and s.in_features == lead.in_features
        and getattr(s, "group", 0) == getattr(lead, "group", 0)
        for s in stacks
    )
    if not joinable:
        return stacks, None, None
    fused, views = lead.cat_outputs(stacks[1:])
    for m, v in zip(linears, views, strict=True):
        m.stack = v
    biases = [m.bias for m in linears]
    ref = next((b for b in biases if b is not None), None)
    bias = None
    if ref is not None:
        bias = torch.cat(
            [b if b is not None else ref.new_zeros(m.out_features)
             for b, m in zip(biases, linears, strict=True)]
        )  # fmt: skip
    return views, fused, bias


def _one_matrix(w: QuantWeight) -> QuantWeight:
    """w [N, K] as a stack of one, [1, N, K]."""
    if isinstance(w, Bf16Weight):
        return Bf16Weight(w.w[None])
    if isinstance(w, Int8Weight):
        return Int8Weight(w.q[None], w.scale[None])
    return Int4Weight(w.q[None], w.scale[None], w.zero[None], w.group)


_LINEARS: dict[str, type[QuantLinear]] = {
    "int8": Int8Linear,
    "int4": Int4Linear,
    "bf16": Bf16Linear,
}


def quantize_linears(model: nn.Module, quant: Quantization) -> None:
    """Replace every nn.Linear of `model` whose weight `quantizes` (by checkpoint name) with
    the scheme's module. QuantizationError (one line naming the weight) if one cannot be."""
    if not quant.enabled:
        return
    cls = _LINEARS[quant.method]
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if type(m) is nn.Linear and quantizes(f"{name}.weight", quant.method)
    ]
    for name, m in targets:
        parent_name, _, attr = name.rpartition(".")
        w = quantize(m.weight, quant, f"{name}.weight")
        bias = None if m.bias is None else m.bias.detach()
        setattr(model.get_submodule(parent_name), attr, cls(w, bias, m.weight.dtype))


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as held (quantized linears at their stored size)."""
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    return sum(p.nbytes for p in model.parameters()) + sum(m.weight_bytes for m in quantized)
