"""Quantized (or bf16) matrices stacked [E, N, K] (E experts, or 1 for a dense linear), one
class per scheme, each in one of two layouts chosen once when built: the panels of
serve_app/kernels/quant.py (CPU, float32 activations, N a panel multiple), whose grouped matmul
dequantizes in registers, or [E, N, K] as quantized, which a matmul dequantizes per call and
hands to torch (CUDA, no compiler, bf16).
Shapes: E matrices, N outputs, K inputs, P = PANEL columns, G int4 group size, n rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from serve_app.kernels import quant as quant_kernel
from serve_app.model.quant.scheme import Bf16Weight, Int4Weight, Int8Weight, QuantWeight

Spans = list[tuple[int, int, int]]


class _Stacked:
    """Tensors with the matrix (expert) on dim 0 (`STACKED` fields): selection and
    concatenation work the same on every layout."""

    STACKED: tuple[str, ...] = ()

    def cat(self, other):
        return dataclasses.replace(
            self, **{f: torch.cat([getattr(self, f), getattr(other, f)]) for f in self.STACKED}
        )

    def cat_outputs(self, others: list) -> tuple:
        """These matrices' outputs then each of `others`' (same scheme, inputs and layout) as
        one stack, and each part re-made as a view into it (dim 1 is the outputs, or their
        panels, in every field; with one matrix on dim 0 a dim-1 slice is contiguous):
        (fused, the parts as views, self's first), so the parts keep no copy of their own."""
        parts = [self, *others]
        if any(getattr(p, self.STACKED[0]).shape[0] != 1 for p in parts):
            raise ValueError("cat_outputs joins single matrices (dense linears)")
        total = sum(p.out_features for p in parts)
        fields = {f: torch.cat([getattr(p, f) for p in parts], 1) for f in self.STACKED}
        fused = dataclasses.replace(self, out_features=total, **fields)
        views, start = [], 0
        for p in parts:
            cut = {}
            for f, t in fields.items():  # dim 1 counts outputs or panels: in proportion
                lo, n = (start * t.shape[1]) // total, (p.out_features * t.shape[1]) // total
                cut[f] = t[:, lo : lo + n]
            views.append(dataclasses.replace(p, **cut))
            start += p.out_features
        return fused, views

    def select(self, keep: list[int]):
        return dataclasses.replace(self, **{f: getattr(self, f)[keep] for f in self.STACKED})

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f).nbytes for f in self.STACKED)

    @property
    def device(self) -> torch.device:
        return getattr(self, self.STACKED[0]).device

    BITS = 0  # the quantized kernel's width for this scheme (8, 4, or 16 for bf16)

    @property
    def kernel_args(self) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """(panels, params, group) as serve_app/kernels/quant.py takes them (packed only)."""
        raise NotImplementedError

    def _kernel(self, kernel, xs: torch.Tensor, spans: Spans, out: torch.Tensor) -> None:
        panels, params, group = self.kernel_args
        kernel.grouped_mm(self.BITS, xs, panels, params, group, spans, out)

    def matmul(self, xs: torch.Tensor, spans: Spans) -> torch.Tensor:
        """[n, N]: rows xs[s:e] times expert `local`'s dequantized [N, K] matrix, transposed."""
        out = xs.new_empty(xs.shape[0], self.out_features)
        kernel = quant_kernel.load() if self.packed else None
        if kernel is not None:
            self._kernel(kernel, xs.contiguous(), spans, out)
            return out
        for local, s, e in spans:
            out[s:e] = F.linear(xs[s:e], self.dequantized(local).to(xs.dtype))
        return out


@dataclass(frozen=True)
class Int8Stack(_Stacked):
    q: torch.Tensor  # [E, N, K] int8, or packed panels [E, N/P, K, P]
    scale: torch.Tensor  # [E, N] float32
    out_features: int
    in_features: int
    packed: bool
    STACKED = ("q", "scale")
    BITS = 8

    @classmethod
    def build(cls, w: Int8Weight, pack: bool) -> Int8Stack:
        _, n, k = w.q.shape
        q = quant_kernel.pack_int8(w.q) if pack else w.q.contiguous()
        return cls(q, w.scale.contiguous(), n, k, pack)

    def dequantized(self, local: int) -> torch.Tensor:
        q = self.q[local]
        if self.packed:  # [N/P, K, P] -> [N, K]
            q = q.transpose(1, 2).reshape(self.out_features, self.in_features)
        return Int8Weight(q, self.scale[local]).dequantize()

    @property
    def kernel_args(self):
        return self.q, self.scale, 0


@dataclass(frozen=True)
class Int4Stack(_Stacked):
    q: torch.Tensor  # packed panels [E, N/P, K, P/2] uint8, or [E, N, K] values 0..15 (a byte
    # each: the dequantizing path holds twice the kernel's bytes)
    params: torch.Tensor  # packed [E, N/P, K/G, 2, P], or [E, N, K/G, 2]: scale and zero
    group: int
    out_features: int
    in_features: int
    packed: bool
    STACKED = ("q", "params")
    BITS = 4

    @classmethod
    def build(cls, w: Int4Weight, pack: bool) -> Int4Stack:
        _, n, k = w.q.shape
        if pack:
            q, params = quant_kernel.pack_int4(w.q, w.scale, w.zero)
        else:
            q, params = w.q.contiguous(), torch.stack([w.scale, w.zero], -1)
        return cls(q, params, w.group, n, k, pack)

    def dequantized(self, local: int) -> torch.Tensor:
        q, p = self.q[local], self.params[local]
        if self.packed:  # back to [N, K] and [N, K/G, 2]
            q = torch.cat([q & 15, q >> 4], -1).transpose(1, 2).reshape(self.out_features, -1)
            p = p.permute(0, 3, 1, 2).reshape(self.out_features, -1, 2)
        return Int4Weight(q, p[..., 0], p[..., 1], self.group).dequantize()

    @property
    def kernel_args(self):
        return self.q, self.params, self.group


@dataclass(frozen=True)
class Bf16Stack(_Stacked):
    w: torch.Tensor  # bfloat16 panels [E, N/P, K/2, P, 2] (quant_kernel.pack_bf16), or [E, N, K]
    out_features: int
    in_features: int
    packed: bool
    STACKED = ("w",)
    BITS = 16

    @classmethod
    def build(cls, w: Bf16Weight, pack: bool) -> Bf16Stack:
        _, n, k = w.w.shape
        pack = pack and k % 2 == 0
        return cls(quant_kernel.pack_bf16(w.w) if pack else w.w.contiguous(), n, k, pack)

    def dequantized(self, local: int) -> torch.Tensor:
        w = self.w[local]
        return (quant_kernel.unpack_bf16(w) if self.packed else w).float()

    @property
    def kernel_args(self):
        return self.w, None, 0


Stack = Int8Stack | Int4Stack | Bf16Stack
STACKS = {Int8Weight: Int8Stack, Int4Weight: Int4Stack, Bf16Weight: Bf16Stack}


def stack(w: QuantWeight, dtype: torch.dtype) -> Stack:
    """w [E, N, K] in the kernel's panels where it applies to `dtype` activations, else as is."""
    lead = w.w if isinstance(w, Bf16Weight) else w.q
    pack = dtype == torch.float32 and quant_kernel.applies(lead.shape[1], lead.device)
    return STACKS[type(w)].build(w, pack)
