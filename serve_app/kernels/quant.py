"""The quantized expert matmul (csrc/quant_mm.c): built on first use like the float kernels
(same flags, cache and CPU key; its own library), loaded with ctypes.

`grouped_mm_int8` / `grouped_mm_int4` / `grouped_mm_bf16`: out[s:e] = x[s:e] @ dequant(W[local]).T
for each (local, s, e) span, the weights dequantized (bf16: widened) in registers. `pack_int8` /
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
        self._mm.argtypes = [ctypes.c_int, _P, _I64, _P, _P, _P, _I64, _P, _P, _I64, _P, _I64]
        self._mm.argtypes += [_P, _I64, _I64, ctypes.c_int]

    def grouped_mm_int8(self, x, panels, scale, spans, out) -> None:
        """x [R, K] float32, panels [E, N/P, K, P] int8, scale [E, N] float32 -> out [R, N]."""
        self._run(8, x, panels, scale, 0, None, spans, out)

    def grouped_mm_int4(self, x, panels, sz, group, spans, out) -> None:
        """x [R, K] float32, panels [E, N/P, K, P/2] uint8, sz [E, N/P, K/G, 2, P] -> out [R, N]."""
        self._run(4, x, panels, None, group, sz, spans, out)

    def grouped_mm_bf16(self, x, panels, spans, out) -> None:
        """x [R, K] float32, panels [E, N/P, K/2, P, 2] bfloat16 -> out [R, N]."""
        self._run(16, x, panels, None, 0, None, spans, out)

    def _run(self, bits, x, w, scale, group, sz, spans, out) -> None:
        # NOTE: a dense linear calls this once per projection and step: plain ints and ctypes
        # arrays here, no small torch tensors (that overhead was 10x the 1-row matmul's)
        for t in (x, w, scale, sz, out):
            if t is not None and not t.is_contiguous():
                raise ValueError("grouped_mm_quant needs contiguous tensors")
        if x.dtype != torch.float32 or out.dtype != torch.float32:
            raise ValueError("grouped_mm_quant takes float32 activations")
        e = w.shape[0]
        starts, ends = (_I64 * e)(), (_I64 * e)()
        for local, s, end in spans:
            starts[local], ends[local] = s, end
        active = (_I64 * len(spans))(*(local for local, _, _ in spans))
        b = self.blocking
        self._mm(
            bits, x.data_ptr(), x.shape[1], starts, ends, active, len(spans), w.data_ptr(),
            scale.data_ptr() if scale is not None else None, group,
            sz.data_ptr() if sz is not None else None, out.shape[1], out.data_ptr(), b.mr, b.kc,
            torch.get_num_threads(),
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
