"""Quantized experts: per MoE layer, gate|up and down stored int8 or int4, one class per scheme.

`QuantExpertWeights` is an ExpertWeights whose w13 / w2 are `Int8Experts` / `Int4Experts`
(weights stacked [E, N, K] as the checkpoint's [out, in] matrices): run_experts, the shards'
adds and drops and the weight-bytes reports go through the same methods as float experts. On
the CPU in float32 with the kernel built, the matrices are packed into the panels of
serve_app/kernels/quant.py and each span's matmul dequantizes in registers; elsewhere (CUDA,
no compiler, bf16) every call dequantizes the experts it runs and uses torch.
Shapes: E experts held, N outputs, K inputs, G int4 group size, n routed rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from serve_app.experts.local import ExpertWeights
from serve_app.kernels import quant as quant_kernel
from serve_app.model.quant.scheme import Int4Weight, Int8Weight, Quantization, quantize

Spans = list[tuple[int, int, int]]


class _Stacked:
    """Tensors with the expert on dim 0 (`STACKED` fields): selection and concatenation work
    the same on every layout."""

    STACKED: tuple[str, ...] = ()

    def cat(self, other):
        return dataclasses.replace(
            self, **{f: torch.cat([getattr(self, f), getattr(other, f)]) for f in self.STACKED}
        )

    def select(self, keep: list[int]):
        return dataclasses.replace(self, **{f: getattr(self, f)[keep] for f in self.STACKED})

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f).nbytes for f in self.STACKED)

    @property
    def device(self) -> torch.device:
        return getattr(self, self.STACKED[0]).device

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
class Int8Experts(_Stacked):
    q: torch.Tensor  # [E, N, K] int8, or packed panels [E, N/P, K, P]
    scale: torch.Tensor  # [E, N] float32
    out_features: int
    in_features: int
    packed: bool
    STACKED = ("q", "scale")

    @classmethod
    def build(cls, w: Int8Weight, pack: bool) -> Int8Experts:
        _, n, k = w.q.shape
        q = quant_kernel.pack_int8(w.q) if pack else w.q.contiguous()
        return cls(q, w.scale.contiguous(), n, k, pack)

    def dequantized(self, local: int) -> torch.Tensor:
        q = self.q[local]
        if self.packed:  # [N/P, K, P] -> [N, K]
            q = q.transpose(1, 2).reshape(self.out_features, self.in_features)
        return Int8Weight(q, self.scale[local]).dequantize()

    def _kernel(self, kernel, xs, spans, out) -> None:
        kernel.grouped_mm_int8(xs, self.q, self.scale, spans, out)


@dataclass(frozen=True)
class Int4Experts(_Stacked):
    q: torch.Tensor  # packed panels [E, N/P, K, P/2] uint8, or [E, N, K] values 0..15
    params: torch.Tensor  # packed [E, N/P, K/G, 2, P], or [E, N, K/G, 2]: scale and zero
    group: int
    out_features: int
    in_features: int
    packed: bool
    STACKED = ("q", "params")

    @classmethod
    def build(cls, w: Int4Weight, pack: bool) -> Int4Experts:
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
    def nbytes(self) -> int:
        # the fallback layout keeps a value per byte; count what a packed copy would hold
        return (self.q.nbytes if self.packed else self.q.nbytes // 2) + self.params.nbytes

    def _kernel(self, kernel, xs, spans, out) -> None:
        kernel.grouped_mm_int4(xs, self.q, self.params, self.group, spans, out)


_SCHEMES = {"int8": Int8Experts, "int4": Int4Experts}


class QuantExpertWeights(ExpertWeights):
    """ExpertWeights over quantized matrices: w13 [E, 2I, D] and w2 [E, D, I] as Int8Experts
    or Int4Experts. `packed` (the float panels' flag) stays False: the float kernel's fused
    path does not apply; gate_up and down run each matrix's own matmul."""

    @classmethod
    def quantize(
        cls,
        w13: torch.Tensor,
        w2: torch.Tensor,
        expert_ids: list[int],
        quant: Quantization,
        dtype: torch.dtype,
        layer: int,
    ) -> QuantExpertWeights:
        """From the checkpoint's [E, 2I, D] gate|up and [E, D, I] down (any float dtype)."""
        scheme = _SCHEMES[quant.method]
        mats = []
        for w, what in ((w13, "gate_up_proj"), (w2, "down_proj")):
            q = quantize(w, quant, f"model.layers.{layer}.experts.{what}")
            pack = dtype == torch.float32 and quant_kernel.applies(w.shape[1], w.device)
            mats.append(scheme.build(q, pack))
        return cls(mats[0], mats[1], expert_ids)

    def with_experts(self, w13, w2, ids: list[int]) -> QuantExpertWeights:
        return QuantExpertWeights(w13, w2, ids)

    @property
    def intermediate_size(self) -> int:
        return self.w2.in_features

    def gate_up(self, xs: torch.Tensor, spans: Spans) -> torch.Tensor:
        return self.w13.matmul(xs, spans)

    def down(self, act: torch.Tensor, spans: Spans) -> torch.Tensor:
        return self.w2.matmul(act, spans)

    def concat(self, other: ExpertWeights) -> QuantExpertWeights:
        ids = self.expert_ids + other.expert_ids
        return QuantExpertWeights(self.w13.cat(other.w13), self.w2.cat(other.w2), ids)

    def select(self, keep: list[int]) -> QuantExpertWeights:
        ids = [self.expert_ids[i] for i in keep]
        return QuantExpertWeights(self.w13.select(keep), self.w2.select(keep), ids)
