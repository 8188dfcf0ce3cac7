"""RMSNorm, computed in float32 like transformers' LlamaRMSNorm so outputs match it.

On the CPU in float32 with the kernels built, one pass of serve_app/kernels' `rms_norm` per
call (and the residual add before a norm in the same pass: `add_rms_norm`); elsewhere the
five torch ops of transformers' own code. Same results up to float32 rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from serve_app.kernels import cpu as cpu_kernel


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = _kernel(x, self.weight)
        if kernel is not None:
            return kernel.rms_norm(x, self.weight, self.eps)[1]
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, norm(x + residual)) for [T, D] tensors, in one pass where it can."""
    kernel = _kernel(x, norm.weight) if x.dim() == 2 and x.shape == residual.shape else None
    if kernel is None or residual.dtype != x.dtype:
        h = x + residual
        return h, norm(h)
    summed, out = kernel.rms_norm(x, norm.weight, norm.eps, residual)
    return summed, out


def _kernel(x: torch.Tensor, weight: torch.Tensor):
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return None
    kernel = cpu_kernel.load()
    return kernel if kernel is not None and kernel.rms_norm_applies(x, weight) else None
