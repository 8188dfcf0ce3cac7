"""Weight-only quantization schemes: what `quantization: none|int8|int4` means for one matrix.

- int8: symmetric per output channel, scale = absmax / 127, q in [-127, 127];
  dequantized w = q * scale.
- int4: asymmetric in groups of `group` inputs along K (as GPTQ / AWQ), q in [0, 15];
  scale = (max - min) / 15 and zero = min + 8 * scale per (row, group), so the dequantized
  w = (q - 8) * scale + zero (the convention of torch's int4pack ops and torchao).
- bf16 (what `engine.dtype: bfloat16` means for the weights on the CPU, precision.py): w
  rounded to bfloat16 (nearest even, as torch's .to), widened back exactly.
The functions work on [..., N, K] (a linear's [out, in] weight, or experts stacked as
[E, N, K]). Which checkpoint tensors are quantized is `methods.quantizes(name)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from serve_app.model.quant.methods import BF16, GROUP_SIZES, METHODS


class QuantizationError(ValueError):
    """A weight that the configured scheme cannot represent (one line naming it)."""


@dataclass(frozen=True, slots=True)
class Quantization:
    """The engine's weight quantization. group_size (int4 only): None = 128, or the largest of
    64 and 32 that divides a matrix's K."""

    method: str = "none"
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS and self.method != BF16:
            raise ValueError(
                f"quantization must be one of {'|'.join(METHODS)}, got {self.method!r}"
            )
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise ValueError(
                f"quantization_group_size must be one of {GROUP_SIZES} (or unset), "
                f"got {self.group_size}"
            )

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def tag(self) -> str:
        """For the model digest and reports: 'none', 'int8', 'int4-g128'."""
        if self.method == "int4" and self.group_size:
            return f"int4-g{self.group_size}"
        return self.method

    def group_for(self, k: int, name: str) -> int:
        """The int4 group size of a matrix with `k` inputs; QuantizationError if none fits."""
        sizes = (self.group_size,) if self.group_size else GROUP_SIZES
        for g in sizes:
            if k % g == 0:
                return g
        raise QuantizationError(
            f"int4 quantization: {name} has {k} inputs, not a multiple of the group size "
            f"{' or '.join(map(str, sizes))}"
        )


NO_QUANT = Quantization()  # float weights


@dataclass(frozen=True, slots=True)
class Int8Weight:
    q: torch.Tensor  # [..., N, K] int8
    scale: torch.Tensor  # [..., N] float32

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale[..., None]


@dataclass(frozen=True, slots=True)
class Int4Weight:
    q: torch.Tensor  # [..., N, K] uint8 in [0, 15] (one value per byte; packed by the users)
    scale: torch.Tensor  # [..., N, K / group] float32
    zero: torch.Tensor  # [..., N, K / group] float32
    group: int

    def dequantize(self) -> torch.Tensor:
        *lead, n, k = self.q.shape
        q = self.q.float().view(*lead, n, k // self.group, self.group)
        w = (q - 8) * self.scale[..., None] + self.zero[..., None]
        return w.view(*lead, n, k)


@dataclass(frozen=True, slots=True)
class Bf16Weight:
    w: torch.Tensor  # [..., N, K] bfloat16

    def dequantize(self) -> torch.Tensor:
        return self.w.float()


QuantWeight = Int8Weight | Int4Weight | Bf16Weight


def combine(ws: list[QuantWeight], fn: Callable[[list[torch.Tensor]], torch.Tensor]) -> QuantWeight:
    """One weight from several of one scheme and group, each tensor field fn(their fields):
    torch.stack (experts), torch.cat (gate | up rows), a row selection (one weight)."""
    first = ws[0]
    group = getattr(first, "group", None)
    if any(type(w) is not type(first) or getattr(w, "group", None) != group for w in ws):
        raise QuantizationError("weights of one matrix mix quantization schemes or groups")
    tensors = [f.name for f in dataclasses.fields(first) if f.name != "group"]
    return dataclasses.replace(first, **{f: fn([getattr(w, f) for w in ws]) for f in tensors})


def quantize(w: torch.Tensor, quant: Quantization, name: str) -> QuantWeight:
    """w [..., N, K] (any float dtype) -> its quantized form under `quant` (int8, int4, bf16)."""
    if quant.method == BF16:
        return Bf16Weight(w.detach().to(torch.bfloat16))
    w = w.detach().float()
    if quant.method == "int8":
        scale = w.abs().amax(-1) / 127
        q = torch.round(w / scale.clamp(min=1e-30)[..., None]).clamp(-127, 127)
        return Int8Weight(q.to(torch.int8), scale)
    if quant.method != "int4":
        raise ValueError(f"no weights to quantize with {quant.method!r}")
    *lead, n, k = w.shape
    g = quant.group_for(k, name)
    wg = w.reshape(*lead, n, k // g, g)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = (hi - lo) / 15
    q = torch.round((wg - lo[..., None]) / scale.clamp(min=1e-30)[..., None]).clamp(0, 15)
    return Int4Weight(q.to(torch.uint8).reshape(*lead, n, k), scale, lo + 8 * scale, g)


def fake_quantize(w: torch.Tensor, quant: Quantization, name: str) -> torch.Tensor:
    """dequantize(quantize(w)) in float32: the weights a float reference runs for parity."""
    return quantize(w, quant, name).dequantize()
