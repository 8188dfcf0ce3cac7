"""Quantized experts: per MoE layer, gate|up and down stored int8 or int4, one class per scheme.

`QuantExpertWeights` is an ExpertWeights whose w13 / w2 are `Int8Stack` / `Int4Stack`
(weights stacked [E, N, K] as the checkpoint's [out, in] matrices): run_experts, the shards'
adds and drops and the weight-bytes reports go through the same methods as float experts. On
the CPU in float32 with the kernel built, the matrices are packed into the panels of
serve_app/kernels/quant.py and each span's matmul dequantizes in registers; elsewhere (CUDA,
no compiler, bf16) every call dequantizes the experts it runs and uses torch.
Shapes: E experts held, N outputs, K inputs, G int4 group size, n routed rows.
"""

from __future__ import annotations

import torch

from serve_app.experts.local import ExpertWeights
from serve_app.kernels import quant as quant_kernel
from serve_app.model.quant.scheme import Quantization, QuantWeight, combine, quantize
from serve_app.model.quant.stacked import Spans, stack


class QuantExpertWeights(ExpertWeights):
    """ExpertWeights over quantized matrices: w13 [E, 2I, D] and w2 [E, D, I] as Int8Stack
    or Int4Stack (or Bf16Stack). `packed` (the float panels' flag) stays False: the float
    kernel does not apply; `mlp_into` runs the quantized kernel's fused MLP where it applies,
    else gate_up and down run each matrix's own matmul."""

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
        mats = [
            stack(quantize(w, quant, f"model.layers.{layer}.experts.{what}"), dtype)
            for w, what in ((w13, "gate_up_proj"), (w2, "down_proj"))
        ]
        return cls(mats[0], mats[1], expert_ids)

    @classmethod
    def held(
        cls, w13: QuantWeight, w2: QuantWeight, expert_ids: list[int], dtype: torch.dtype,
        device: torch.device,
    ) -> QuantExpertWeights:  # fmt: skip
        """From a pre-quantized checkpoint's [E, 2I, D] gate|up and [E, D, I] down, as held."""
        mats = [stack(combine([w], lambda ts: ts[0].to(device)), dtype) for w in (w13, w2)]
        return cls(mats[0], mats[1], expert_ids)

    def with_experts(self, w13, w2, ids: list[int]) -> QuantExpertWeights:
        return QuantExpertWeights(w13, w2, ids)

    @property
    def intermediate_size(self) -> int:
        return self.w2.in_features

    def mlp_into(self, xs, spans, row_weights, dest, slots) -> bool:
        """The quantized kernel's one-region MLP (ExpertWeights.mlp_into) where both matrices
        are in its panels, of a width it fuses, with I a panel multiple."""
        kernel = quant_kernel.load()
        w13, w2 = self.w13, self.w2
        if (
            kernel is None
            or not (w13.packed and w2.packed)
            or xs.dtype != torch.float32
            or w13.BITS not in kernel.fused_bits
            or self.intermediate_size % quant_kernel.PANEL
        ):
            return False
        (p13, s13, g13), (p2, s2, g2) = w13.kernel_args, w2.kernel_args
        inter = self.intermediate_size
        kernel.moe_mlp(
            w13.BITS, xs, p13, s13, p2, s2, (g13, g2), inter, spans, row_weights, dest, slots
        )
        return True

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
