"""The LoRA gather kernel (csrc/lora_mm.c): built on first use like the other CPU kernels
(same flags, cache and CPU key; its own library), loaded with ctypes.

`bgmv_(x, slots, experts, factors, out)`: out[r] += (x[r] @ A.T) @ B.T with the factors of
row r's adapter slot (and expert), in one call per module and step; rows of slot -1, or of a
slot whose factors are None, are left untouched. `pack(a, b)` makes a slot's factors: A as is
and B transposed, float32 contiguous, kept with the adapter (serve_app/lora/batch.py).
`load()` returns None where the kernel cannot be built (or MOESERVE_CPU_KERNEL=0): the caller
then runs its torch ops.
Shapes: T rows, K in features, N out features, r rank, E experts (1 for a linear).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import subprocess
from typing import NamedTuple

import torch

from serve_app.kernels import settings, tuning
from serve_app.kernels.build import CSRC, open_library

logger = logging.getLogger(__name__)

SOURCES = (CSRC / "lora_mm.c",)

_P = ctypes.c_void_p
_I64 = ctypes.c_int64


class Factors(NamedTuple):
    """One slot's packed factors: a [E, r, K], bt [E, r, N] (B transposed), float32; their
    addresses and sizes read once here (the per-call loop runs per adapter and module)."""

    a: torch.Tensor
    bt: torch.Tensor
    a_ptr: int
    bt_ptr: int
    rank: int
    k: int
    n: int


def pack(a: torch.Tensor, b: torch.Tensor) -> Factors:
    """A [r, K] / [E, r, K] and B [N, r] / [E, N, r] -> Factors (A copied only where needed).

    NOTE: detached, so the factors share A's storage but hold no reference to the tensor
    object itself, which serve_app/lora/batch.py uses as the weak cache key."""
    a3 = a.detach() if a.dim() == 3 else a.detach()[None]
    b3 = b.detach() if b.dim() == 3 else b.detach()[None]
    a3 = a3.to(torch.float32).contiguous()
    bt = b3.to(torch.float32).transpose(1, 2).contiguous()
    _, r, k = a3.shape
    return Factors(a3, bt, a3.data_ptr(), bt.data_ptr(), r, k, bt.shape[2])


class LoraKernels:
    def __init__(self, lib: ctypes.CDLL):
        self._bgmv = lib.moeserve_lora_bgmv
        self._bgmv.restype = None
        self._bgmv.argtypes = [_P, _I64, _I64, _I64, _P, _P, _P, _P, _P, _I64, _P, _I64, _I64]
        self._bgmv.argtypes += [ctypes.c_int]
        lib.moeserve_lora_max_rank.restype = _I64
        self.max_rank = lib.moeserve_lora_max_rank()

    def applies(self, x: torch.Tensor, out: torch.Tensor) -> bool:
        """Whether bgmv_ takes these rows: float32 on the CPU, unit column stride."""
        return (
            x.device.type == "cpu" and x.dtype == torch.float32 and out.dtype == torch.float32
            and x.dim() == 2 and out.dim() == 2 and x.stride(1) == 1 and out.stride(1) == 1
        )  # fmt: skip

    def bgmv_(
        self,
        x: torch.Tensor,
        slots: torch.Tensor,
        experts: torch.Tensor | None,
        factors: list[Factors | None],
        out: torch.Tensor,
    ) -> None:
        """out[r] += x[r] @ A[s, e].T @ Bt[s, e], s = slots[r] (int64, -1: base), e =
        experts[r] (int64; None: 0). x [T, K], out [T, N] (a column slice is fine)."""
        rows, k = x.shape
        n = out.shape[1]
        if not slots.is_contiguous() or slots.dtype != torch.int64 or len(slots) != rows:
            raise ValueError("bgmv_ takes one contiguous int64 slot per row")
        if experts is not None and (not experts.is_contiguous() or experts.dtype != torch.int64):
            raise ValueError("bgmv_ takes contiguous int64 experts")
        m = len(factors)
        a_ptr, bt_ptr, ranks = (_I64 * m)(), (_I64 * m)(), (_I64 * m)()
        for i, f in enumerate(factors):
            if f is None:
                continue
            if f.rank > self.max_rank or f.k != k or f.n != n:
                raise ValueError(f"LoRA factors {tuple(f.a.shape)} do not fit rows [{rows}, {k}]")
            a_ptr[i], bt_ptr[i], ranks[i] = f.a_ptr, f.bt_ptr, f.rank
        self._bgmv(
            x.data_ptr(), x.stride(0), rows, k, slots.data_ptr(),
            experts.data_ptr() if experts is not None else None, a_ptr, bt_ptr, ranks, m,
            out.data_ptr(), out.stride(0), n, torch.get_num_threads(),
        )  # fmt: skip


@functools.cache
def load() -> LoraKernels | None:
    """The kernel, built if needed; None where it cannot be (callers fall back to torch)."""
    env = settings.read()
    try:
        lanes = _lanes(env)
        opened = open_library(env, "moeserve_lora_vector_lanes", lanes, SOURCES, "moeserve-lora")
        if opened is None:
            return None
        return LoraKernels(opened[0])
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        logger.warning("LoRA CPU kernel unavailable (%s): torch is used instead", e)
        return None


def _lanes(env: settings.KernelSettings) -> int:
    """The vector width the library must report: the forced one, else this CPU's."""
    if env.vector_lanes is not None:
        return env.vector_lanes
    return 16 if tuning.cpu_info().avx512 else 8
