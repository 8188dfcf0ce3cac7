"""GPTQ checkpoints (`quant_method: gptq`), as AutoGPTQ / GPTQModel write them and vLLM's
`gptq.py` / transformers read them.

Per linear: `qweight` int32 [K / 8, N] (8 4-bit values a word along K, lowest bits first),
`qzeros` int32 [K / G, N / 8] (packed the same way along N), `scales` fp16 [K / G, N] and
`g_idx` int32 [K] (the group of each input). w[n, k] = (q[k, n] - z[g, n]) * s[g, n], g =
g_idx[k], where z is the stored zero plus one in the original ("gptq", v1) checkpoint format
and the stored zero in GPTQModel's `checkpoint_format: gptq_v2`.
- bits 4 with groups of 32 / 64 / 128 in order map onto Int4Weight (zero = (8 - z) * s);
- bits 8 map onto Int8Weight only with one group per row (group_size -1) and z = 128
  (symmetric): w = (q - 128) * s per output channel;
- act-order (desc_act): a g_idx whose groups are contiguous runs of G inputs (in any order)
  maps exactly (the scales and zeros are reordered); one that scatters a group along K is
  refused, as are other bits and group sizes.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from serve_app.model.quant.formats.base import (
    CheckpointFormat,
    Reader,
    check_group,
    group_of_runs,
    int4_from_zero_points,
    unpack_int32,
)
from serve_app.model.quant.scheme import Int8Weight, QuantizationError


class GPTQFormat(CheckpointFormat):
    method = "gptq"
    marker = "qweight"
    suffixes = ("qweight", "qzeros", "scales", "g_idx")

    def __init__(self, config: Mapping) -> None:
        self.bits = int(config.get("bits", 4))
        group = int(config.get("group_size", 128))
        fmt = config.get("checkpoint_format") or config.get("format") or "gptq"
        if fmt not in ("gptq", "gptq_v2"):
            raise QuantizationError(f"gptq checkpoint: checkpoint_format {fmt!r} is not supported")
        self.zero_offset = 1 if fmt == "gptq" else 0  # v1 stores zero - 1
        if self.bits == 4:
            self.scheme, self.group = "int4", check_group("gptq", group)
        elif self.bits == 8 and group == -1:
            self.scheme, self.group = "int8", None
        else:
            raise QuantizationError(
                f"gptq checkpoint: bits {self.bits} with group_size {group} is not supported "
                "(4 bits in groups, or 8 bits with group_size -1)"
            )

    def shape(self, shapes: Mapping[str, tuple[int, ...]], read: Reader) -> tuple[int, int]:
        words, n = shapes["qweight"]  # [K * bits / 32, N]
        return n, words * 32 // self.bits

    def load(self, t: Mapping[str, torch.Tensor], name: str) -> Int8Weight:
        q = unpack_int32(t["qweight"], self.bits, 0).t()  # [N, K]
        zeros = unpack_int32(t["qzeros"], self.bits, 1).t().int() + self.zero_offset
        scales = t["scales"].t()  # [N, K / G]
        if self.bits == 8:
            if not bool((zeros == 128).all()):
                raise QuantizationError(
                    f"gptq checkpoint: {name} is asymmetric int8: not supported"
                )
            return Int8Weight((q.int() - 128).to(torch.int8).contiguous(), scales[:, 0].float())
        if "g_idx" in t:  # act-order: the runs' groups, possibly out of order
            runs = group_of_runs(t["g_idx"], self.group, name)
            zeros, scales = zeros[:, runs], scales[:, runs]
        return int4_from_zero_points(
            q.contiguous(), zeros.contiguous(), scales.contiguous(), self.group
        )
