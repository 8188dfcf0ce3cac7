"""The contract of a pre-quantized checkpoint format, and the bit unpacking they share.

A format is built once from config.json's `quantization_config` (refusing, with one
QuantizationError line, what it cannot hold) and then turns the tensors of one linear
(`<prefix>.<suffix>`, e.g. `qweight`, `qzeros`, `scales`) into our own weight: an
`Int8Weight` / `Int4Weight` [N, K] (serve_app/model/quant/scheme.py) where the format maps
onto our schemes, or a float [N, K] tensor where it is dequantized at load (fp8).
Shapes: N outputs, K inputs, G group size, W packed words.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping

import torch

from serve_app.model.quant.methods import GROUP_SIZES
from serve_app.model.quant.scheme import Int4Weight, Int8Weight, Quantization, QuantizationError

Loaded = Int8Weight | Int4Weight | torch.Tensor
Reader = Callable[[str], torch.Tensor]


class CheckpointFormat(ABC):
    """One pre-quantized format.

    - `scheme`: what its linears load as: "int8" / "int4" (held quantized, our schemes), or
      "none" (dequantized to float at load; the engine's configured scheme then applies as to
      a float checkpoint);
    - `group`: the int4 group size (None otherwise);
    - `marker`: the tensor suffix whose presence marks a quantized linear; `suffixes`: every
      tensor suffix one linear may have (the loader gathers them for `load`);
    - `load(tensors, name)`: suffix -> tensor of one linear, to our weight [N, K]; a
      QuantizationError (one line naming `name`) for what does not map;
    - `shape(shapes, read)`: its [N, K] from the headers.
    """

    method: str  # config.json's quant_method
    scheme: str = "none"
    group: int | None = None
    marker: str
    suffixes: tuple[str, ...]

    @abstractmethod
    def load(self, tensors: Mapping[str, torch.Tensor], name: str) -> Loaded: ...

    @abstractmethod
    def shape(self, shapes: Mapping[str, tuple[int, ...]], read: Reader) -> tuple[int, int]:
        """(N, K) of one linear from its tensors' header shapes (suffix -> shape), without
        loading it: what a LoRA adapter is checked against. `read(suffix)` reads a tensor
        where the format stores the shape as a value (a few bytes)."""

    def tag(self) -> str:
        """For the digest and reports: 'gptq-int4-g128', 'fp8-block128x128'."""
        if self.scheme == "int4":
            return f"{self.method}-int4-g{self.group}"
        return f"{self.method}-{self.scheme}"

    def held(self, quant: Quantization) -> Quantization:
        """The scheme the engine holds these weights in, given the configured one: the
        checkpoint's own where it is quantized (`none` = as the checkpoint is; the same scheme
        is accepted; another is refused), the configured one where it loads as float."""
        if self.scheme == "none":
            return quant
        own = Quantization(self.scheme, self.group)
        same = quant.method == self.scheme and quant.group_size in (None, self.group)
        if quant.enabled and not same:
            raise QuantizationError(
                f"quantization {quant.tag()} asked, but the checkpoint is pre-quantized "
                f"{self.tag()}: use quantization none to serve it as it is"
            )
        return own


def unpack_int32(
    packed: torch.Tensor, bits: int, dim: int, order: tuple[int, ...] | None = None
) -> torch.Tensor:
    """int32 words holding 32 / bits values each, lowest bits first, along `dim` -> the values
    (uint8) with that dim 32 / bits times longer. `order`: word position i holds element
    order[i] of its run (AWQ's interleave); None: position i holds element i."""
    per = 32 // bits
    p = packed.to(torch.int32).movedim(dim, -1)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    vals = (p[..., None] >> shifts) & ((1 << bits) - 1)  # [..., W, per]; the mask drops sign
    if order is not None:
        vals = vals[..., torch.argsort(torch.tensor(order))]
    return vals.reshape(*p.shape[:-1], -1).to(torch.uint8).movedim(-1, dim).contiguous()


def int4_from_zero_points(
    q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group: int
) -> Int4Weight:
    """w = (q - z) * s (GPTQ / AWQ), q [N, K] in [0, 15], z and s [N, K / G], as our
    w = (q - 8) * s + zero: zero = (8 - z) * s. (q - 8) * s and (8 - z) * s are exact in fp32
    (a 4-bit integer times an fp16 / bf16 scale); their sum rounds once, so each weight is
    within one fp32 rounding of the format's own dequantization."""
    s = scales.float()
    return Int4Weight(q.to(torch.uint8), s, (8 - zeros.float()) * s, group)


def check_group(method: str, group: int) -> int:
    if group not in GROUP_SIZES:
        raise QuantizationError(
            f"{method} checkpoint: group_size {group} is not supported "
            f"(int4 groups of {', '.join(map(str, GROUP_SIZES))})"
        )
    return group


def group_of_runs(g_idx: torch.Tensor, group: int, name: str) -> torch.Tensor:
    """The checkpoint group of each run of `group` inputs along K ([K / G]), where every run
    shares one group: k // G, or act-order (desc_act) groups that happen to be contiguous runs
    in another order, which map exactly by reordering the scales and zeros. A g_idx that puts
    inputs of one group apart along K is refused: our groups are contiguous runs of K, and
    permuting K would need the activations permuted too."""
    runs = g_idx.long().cpu().view(-1, group)
    if not bool((runs == runs[:, :1]).all()):
        raise QuantizationError(
            f"gptq checkpoint: {name} has an act-order g_idx (desc_act) whose groups are not "
            f"contiguous runs of {group} inputs: not supported"
        )
    return runs[:, 0]
