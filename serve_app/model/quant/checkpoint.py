"""A pre-quantized checkpoint's linears, held as the checkpoint has them (no float round trip).

`read_linears` gathers each quantized linear's tensors (`<prefix>.qweight`, `.scales`, ...)
into one `<prefix>.weight` entry, our Int8Weight / Int4Weight (or float, fp8), through the
checkpoint's format module (serve_app/model/quant/formats/). The dense loader then copies a
row probe in place of each weight it will hold quantized, lets the modules' `after_load` run
(MLA's rope row permutation), reads the permutation back from the probe and swaps in the
quantized linear with its rows in that order: per-row schemes commute with a row
permutation, and the permutation is observed, not written down a second time.
Shapes: N outputs, K inputs.
"""

from __future__ import annotations

import torch
from torch import nn

from serve_app.model.config import ModelSpec
from serve_app.model.quant.formats import CheckpointFormat, checkpoint_format
from serve_app.model.quant.linear import Int4Linear, Int8Linear
from serve_app.model.quant.methods import quantizes
from serve_app.model.quant.scheme import Int4Weight, Int8Weight, Quantization, QuantWeight, combine

_BASE = 64  # probe digits: exact in bf16 / fp16 (8+ bits of mantissa)


def held_quantization(spec: ModelSpec, quant: Quantization) -> Quantization:
    """The scheme the engine holds the weights in: the checkpoint's where it is pre-quantized
    (a conflicting configured one is refused, serve_app/model/quant/formats/base.py), else
    the configured one."""
    fmt = checkpoint_format(spec.hf_config)
    return quant if fmt is None else fmt.held(quant)


def read_linears(fmt: CheckpointFormat | None, tensors: dict[str, torch.Tensor]) -> dict:
    """name -> tensor with each quantized linear's tensors replaced by `<prefix>.weight` ->
    its weight as `fmt` loads it (Int8Weight / Int4Weight [N, K], or float)."""
    if fmt is None:
        return tensors
    out = dict(tensors)
    tail = "." + fmt.marker
    for prefix in [n.removesuffix(tail) for n in tensors if n.endswith(tail)]:
        parts = {s: out.pop(f"{prefix}.{s}") for s in fmt.suffixes if f"{prefix}.{s}" in out}
        out[f"{prefix}.weight"] = fmt.load(parts, f"{prefix}.weight")
    return out


def split_held(dense: dict) -> tuple[dict[str, torch.Tensor], dict[str, QuantWeight]]:
    """(float tensors, quantized weights the model holds quantized): a quantized weight that
    `quantizes` keeps float (the routers, MLA's kv_b_proj) is dequantized; each held one
    leaves a row probe in the float tensors, for `hold_linears`."""
    floats, held = {}, {}
    for name, w in dense.items():
        if not isinstance(w, (Int8Weight, Int4Weight)):
            floats[name] = w
        elif quantizes(name):
            held[name] = w
            floats[name] = row_probe(*w.q.shape)
        else:
            floats[name] = w.dequantize()
    return floats, held


def row_probe(n: int, k: int) -> torch.Tensor:
    """[n, k] whose row r holds r in base-64 digits in its first three columns."""
    r = torch.arange(n)
    probe = torch.zeros(n, k)
    probe[:, 0], probe[:, 1], probe[:, 2] = r % _BASE, r // _BASE % _BASE, r // _BASE**2
    return probe


def probed_rows(weight: torch.Tensor) -> torch.Tensor:
    """The row order a probe ended in: new row i is checkpoint row rows[i]."""
    d = weight[:, :3].float().round().long().cpu()
    return d[:, 0] + _BASE * d[:, 1] + _BASE**2 * d[:, 2]


def hold_linears(model: nn.Module, held: dict[str, QuantWeight], dtype: torch.dtype) -> None:
    """Swap each probed nn.Linear for Int8Linear / Int4Linear over its checkpoint weight,
    rows in the order the probe shows."""
    for name, w in held.items():
        path = name.removesuffix(".weight")
        parent_name, _, attr = path.rpartition(".")
        m = model.get_submodule(path)
        w = _rows(w, probed_rows(m.weight), m.weight.device)
        cls = Int8Linear if isinstance(w, Int8Weight) else Int4Linear
        bias = None if m.bias is None else m.bias.detach()
        setattr(model.get_submodule(parent_name), attr, cls(w, bias, dtype))


def _rows(w: QuantWeight, rows: torch.Tensor, device: torch.device) -> QuantWeight:
    return combine([w], lambda ts: ts[0][rows].to(device).contiguous())
