"""Dense projections through the CPU panel kernel: several nn.Linear that read the same input
(q, k and v) become one packed matrix and one kernel call.

On the CPU in float32 with the kernels built, the weights are packed once, on first use, into
the [1, N/P, K, P] panels of serve_app/kernels/cpu.py (the nn.Linear modules keep their own
weights, for loading, parity tests and other devices); at decode each panel is one contiguous
stream from memory, where MKL's sgemm reached about half the bandwidth, and on CPUs where the
calibration found MKL slower it is used for prefill rows too (serve_app/kernels/tuning.py).
Elsewhere, or when an output size is no panel multiple, this is F.linear per module.
Shapes: T tokens, K input features, N output features (summed over the modules).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from serve_app.kernels import cpu as cpu_kernel
from serve_app.lora import batch as lora
from serve_app.model.quant import linear as quant_linear

# first module of a group -> (weight versions it was packed from, panels, bias or None)
_packed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def project(
    x: torch.Tensor, *linears: nn.Linear, rows: slice | None = None
) -> tuple[torch.Tensor, ...]:
    """(F.linear(x, m.weight, m.bias) for m in linears), as one kernel call where it applies,
    plus the LoRA delta of each row's adapter where a LoRA batch is active (`rows`: the rows
    of the micro-batch that x holds, None: all of them).

    NOTE: the outputs may be column slices of one [T, N] tensor (not contiguous). Quantized
    linears (serve_app/model/quant/linear.py) run their own kernel, one call for the group
    where their panels join (`project_group`), else one each."""
    outs = _base(x, linears)
    batch = lora.current()
    if batch is not None:
        for m, y in zip(linears, outs, strict=True):
            batch.add_linear_(getattr(m, "lora_name", None), x, y, rows)
    return outs


def _base(x: torch.Tensor, linears: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, ...]:
    if not all(type(m) is nn.Linear for m in linears):
        fused = quant_linear.project_group(x, linears) if len(linears) > 1 else None
        return fused if fused is not None else tuple(m(x) for m in linears)
    kernel = cpu_kernel.load() if x.device.type == "cpu" and x.dtype == torch.float32 else None
    rows = x.shape[0]
    if kernel is None or (kernel.blocking.mkl_rows and rows > kernel.blocking.mkl_rows):
        return tuple(F.linear(x, m.weight, m.bias) for m in linears)
    packed = _panels(linears)
    if packed is None:
        return tuple(F.linear(x, m.weight, m.bias) for m in linears)
    panels, bias = packed
    y = kernel.linear(x.reshape(rows, -1), panels)
    if bias is not None:
        y += bias
    if len(linears) == 1:
        return (y,)
    return tuple(y.split([m.out_features for m in linears], dim=1))


def _panels(linears: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    weights = [m.weight for m in linears]
    versions = tuple((w.data_ptr(), _version(w)) for w in weights)
    cached = _packed.get(linears[0])
    if cached is not None and cached[0] == versions:
        return cached[1]
    n = sum(w.shape[0] for w in weights)
    if weights[0].dtype != torch.float32 or n % cpu_kernel.PANEL:
        entry = None
    else:
        with torch.no_grad():
            w = torch.cat([w.detach() for w in weights]).t()[None]  # input-major [1, K, N]
            biases = [m.bias for m in linears]
            bias = None
            if any(b is not None for b in biases):
                bias = torch.cat(
                    [b.detach() if b is not None else w.new_zeros(m.out_features)
                     for b, m in zip(biases, linears, strict=True)]
                )  # fmt: skip
            entry = (cpu_kernel.pack(w), bias)
    _packed[linears[0]] = (versions, entry)
    return entry


def _version(w: torch.Tensor) -> int:
    """In-place updates bump it (a reload repacks); inference tensors have none."""
    try:
        return w._version
    except RuntimeError:
        return -1
