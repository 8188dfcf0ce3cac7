"""The quantized expert matmul (csrc/quant_mm.c): built on first use like the float kernels
(same flags, cache and CPU key; its own library), loaded with ctypes.

`grouped_mm_int8` / `grouped_mm_int4` / `grouped_mm_bf16` (or `grouped_mm` by width): out[s:e] =
x[s:e] @ dequant(W[local]).T for each (local, s, e) span, the weights dequantized (bf16: widened)
in registers. `moe_mlp`: a MoE layer's whole expert MLP over such weights in one call. `pack_int8` /
`pack_int4` / `pack_bf16` turn [E, N, K] experts (serve_app/model/quant/scheme.py) into the
kernel's panels.
`load()` returns None where the kernels cannot be built (or MOESERVE_CPU_KERNEL=0): the callers
then dequantize and run torch.
Shapes: E experts, N outputs, K inputs, P = PANEL columns, G group size.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import subprocess

import torch

from serve_app.kernels import settings, tuning
from serve_app.kernels.build import CSRC, open_library
from serve_app.kernels.tuning import Blocking

logger = logging.getLogger(__name__)

PANEL = 32  # NB in csrc/quant_mm.c (checked when it loads)
SOURCES = (CSRC / "quant_mm.c",)

_P = ctypes.c_void_p
_I64 = ctypes.c_int64


class QuantKernels:
    def __init__(self, lib: ctypes.CDLL, blocking: Blocking):
        self.blocking = blocking
        self._mm = lib.moeserve_grouped_mm_quant
        self._mm.restype = None
        self._mm.argtypes = [ctypes.c_int, _P, _I64, _P, _P, _P, _I64, _P, _P, _I64, _I64, _P]
        self._mm.argtypes += [_I64, _I64, ctypes.c_int]
        self._mlp = lib.moeserve_moe_mlp_quant
        self._mlp.restype = None
        self._mlp.argtypes = [ctypes.c_int, _P, _I64, _P, _P, _P, _I64, _P, _P, _P, _P, _I64]
        self._mlp.argtypes += [_I64, _I64, _P, _P, _P, _P, _P, _P, _I64, _I64, ctypes.c_int]
        lib.moeserve_quant_has_dpbf16.restype = _I64
        # the bf16 tiles are avx512_bf16's: the fused MLP (widening only) is not used for bf16
        self.fused_bits = (8, 4) if lib.moeserve_quant_has_dpbf16() else (8, 4, 16)
        # a dense linear's spans, [(0, 0, rows)]: its arrays built once (NOTE: a dense linear
        # calls this once per projection and step, so no per-call torch tensors here)
        self._zero = (_I64 * 1)(0)

    def grouped_mm_int8(self, x, panels, scale, spans, out) -> None:
        """x [R, K] float32, panels [E, N/P, K, P] int8, scale [E, N] float32 -> out [R, N]."""
        self.grouped_mm(8, x, panels, scale, 0, spans, out)

    def grouped_mm_int4(self, x, panels, sz, group, spans, out) -> None:
        """x [R, K] float32, panels [E, N/P, K, P/2] uint8, sz [E, N/P, K/G, 2, P] -> out [R, N]."""
        self.grouped_mm(4, x, panels, sz, group, spans, out)

    def grouped_mm_bf16(self, x, panels, spans, out) -> None:
        """x [R, K] float32, panels [E, N/P, K/2, P, 2] bfloat16 -> out [R, N]."""
        self.grouped_mm(16, x, panels, None, 0, spans, out)

    def moe_mlp(self, bits, xs, w13, p13, w2, p2, groups, inter, spans, weights, dest, y):
        """Every span's expert MLP, weight * down(silu(gate) * up), in one parallel region: row
        r of the result goes to y[dest[r]]. w13 / p13 and w2 / p2: [E, 2I, D] gate|up and
        [E, D, I] down as grouped_mm_int8 / int4 / bf16 take them (p: the scales, or the int4
        scales and zeros, or None; groups: each one's int4 group size); xs [n, D] rows sorted
        by expert; weights [n] float32; dest [n] int64, distinct rows of y [S, D]."""
        n, d = xs.shape
        for t in (xs, w13, p13, w2, p2, weights, dest, y):
            if t is not None and not t.is_contiguous():
                raise ValueError("moe_mlp_quant needs contiguous tensors")
        if xs.dtype != torch.float32 or y.dtype != torch.float32 or dest.dtype != torch.int64:
            raise ValueError("moe_mlp_quant takes float32 rows and int64 destinations")
        starts, ends, active, n_active = self._spans(w13.shape[0], spans)
        gate_up, act = xs.new_empty(n, 2 * inter), xs.new_empty(n, inter)
        down = torch.empty_like(xs)
        b = self.blocking
        self._mlp(
            bits, xs.data_ptr(), d, starts, ends, active, n_active, w13.data_ptr(),
            p13.data_ptr() if p13 is not None else None, w2.data_ptr(),
            p2.data_ptr() if p2 is not None else None, *groups, inter, weights.data_ptr(),
            dest.data_ptr(), gate_up.data_ptr(), act.data_ptr(), down.data_ptr(), y.data_ptr(),
            b.mr, b.kc, torch.get_num_threads(),
        )  # fmt: skip

    def _spans(self, e: int, spans):
        """starts, ends (per local matrix), the active ones and their count, as ctypes arrays."""
        if e == 1 and len(spans) == 1 and spans[0][:2] == (0, 0):  # a dense linear
            return self._zero, (_I64 * 1)(spans[0][2]), self._zero, 1
        starts, ends = (_I64 * e)(), (_I64 * e)()
        for local, s, end in spans:
            starts[local], ends[local] = s, end
        active = (_I64 * len(spans))(*(local for local, _, _ in spans))
        return starts, ends, active, len(spans)

    def grouped_mm(self, bits, x, w, params, group, spans, out) -> None:
        """grouped_mm_int8 / int4 / bf16 by width (bits 8, 4, 16); params: the scales, or the
        int4 scales and zeros, or None."""
        for t in (x, w, params, out):
            if t is not None and not t.is_contiguous():
                raise ValueError("grouped_mm_quant needs contiguous tensors")
        if x.dtype != torch.float32 or out.dtype != torch.float32:
            raise ValueError("grouped_mm_quant takes float32 activations")
        starts, ends, active, n_active = self._spans(w.shape[0], spans)
        b = self.blocking
        self._mm(
            bits, x.data_ptr(), x.shape[1], starts, ends, active, n_active, w.data_ptr(),
            params.data_ptr() if params is not None else None, group, out.shape[1],
            out.data_ptr(), b.mr, b.kc, torch.get_num_threads(),
        )  # fmt: skip


def applies(n: int, device: torch.device) -> bool:
    """Whether [E, N, K] experts with N outputs can be packed for the kernel here."""
    return device.type == "cpu" and n % PANEL == 0 and load() is not None


def pack_bf16(w: torch.Tensor) -> torch.Tensor:
    """[E, N, K] (K even) -> bf16 panels [E, N/P, K/2, P, 2]: the K rows of a pair interleaved
    per column (the layout avx512_bf16's vdpbf16ps multiplies; csrc/quant_mm.c)."""
    e, n, k = w.shape
    return w.to(torch.bfloat16).view(e, n // PANEL, PANEL, k // 2, 2).transpose(2, 3).contiguous()


def unpack_bf16(panels: torch.Tensor) -> torch.Tensor:
    """pack_bf16's inverse for one matrix: [N/P, K/2, P, 2] -> [N, K]."""
    np_, kh, p, _ = panels.shape
    return panels.transpose(1, 2).reshape(np_ * p, kh * 2)


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """[E, N, K] int8 -> panels [E, N/P, K, P]."""
    e, n, k = q.shape
    return q.view(e, n // PANEL, PANEL, k).transpose(2, 3).contiguous()


def pack_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
    """[E, N, K] values 0..15, scale / zero [E, N, K/G] -> (panels [E, N/P, K, P/2] uint8,
    scales and zeros [E, N/P, K/G, 2, P])."""
    e, n, k = q.shape
    cols = q.view(e, n // PANEL, PANEL, k).transpose(2, 3)  # [E, N/P, K, P]
    half = PANEL // 2
    panels = (cols[..., :half] | (cols[..., half:] << 4)).contiguous()
    g = scale.shape[-1]
    sz = torch.stack([scale, zero], -1)  # [E, N, K/G, 2]
    sz = sz.view(e, n // PANEL, PANEL, g, 2).permute(0, 1, 3, 4, 2).contiguous()
    return panels, sz


@functools.cache
def load() -> QuantKernels | None:
    """The kernel, built if needed; None where it cannot be (callers fall back to torch)."""
    env = settings.read()
    try:
        opened = open_library(env, "moeserve_quant_panel_width", PANEL, SOURCES, "moeserve-quant")
        if opened is None:
            return None
        lib = opened[0]
        blocking = tuning.apply_forced(tuning.from_cpu(tuning.cpu_info()), env.forced_blocking)
        return QuantKernels(lib, blocking)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        logger.warning("quantized CPU kernel unavailable (%s): torch is used instead", e)
        return None
