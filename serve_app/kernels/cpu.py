"""moeserve's CPU kernels (csrc/*.c): built on first use, loaded with ctypes.

- `grouped_mm`: the expert matmuls of a MoE layer for the few rows per expert of decode;
- `paged_decode`: attention of decoding sequences, reading K/V in place through block tables.

They are compiled with the system C compiler (`-O3 -march=native -fopenmp`) into a per-user cache
keyed by the source, the flags, the compiler and this CPU's model and flags, so a cache shared
by different machines never hands one of them another's instructions. It links torch's own
libgomp (already loaded), so torch and the kernel share one OpenMP pool.

Nothing to install: with no C compiler, a failed build, or MOESERVE_CPU_KERNEL=0, `load()`
returns None and the callers run plain torch instead (same results up to float32 rounding).
Packed expert weights are [E, N/P, K, P] (P = `PANEL` columns): `pack` / `panel_matmul`.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name("csrc") / f for f in ("grouped_mm.c", "paged_decode.c"))
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared")
PANEL = 32  # must match NB in the C source (checked when it loads)
SMALL_ROWS = 48  # experts with more rows than this are compute-bound: MKL does them better

_P = ctypes.c_void_p
_I64 = ctypes.c_int64


class CpuKernels:
    def __init__(self, lib: ctypes.CDLL):
        self._mm = lib.moeserve_grouped_mm
        self._mm.restype = None
        self._mm.argtypes = [_P, _I64, _P, _P, _P, _I64, _P, _I64, _P, ctypes.c_int]
        self._attn = lib.moeserve_paged_decode
        self._attn.restype = None
        self._attn.argtypes = [_P, _P, _P, _P, _I64, _P, _P, _I64, _I64, _I64, _I64, _I64]
        self._attn.argtypes += [ctypes.c_float, _P, ctypes.c_int]
        limits = lib.moeserve_paged_decode_limits
        limits.restype = _I64
        limits.argtypes = [_I64]
        (
            self.max_heads,
            self.max_head_dim,
            self.max_heads_x_dim,
            self.max_block_size,
            self.head_dim_multiple,
        ) = (limits(i) for i in range(5))

    def grouped_mm(
        self, x: torch.Tensor, w: torch.Tensor, spans: list[tuple[int, int, int]], out: torch.Tensor
    ) -> None:
        """out[s:e] = x[s:e] @ W[local] for each (local, s, e) span, in one parallel call.

        x [R, K] and out [R, N] contiguous float32; w packed [E, N/P, K, P]."""
        num_experts, _, k, _ = w.shape
        starts = torch.zeros(num_experts, dtype=torch.int64)
        ends = torch.zeros(num_experts, dtype=torch.int64)
        active = torch.tensor([local for local, _, _ in spans], dtype=torch.int64)
        for local, s, e in spans:
            starts[local], ends[local] = s, e
        if not (x.is_contiguous() and out.is_contiguous() and w.is_contiguous()):
            raise ValueError("grouped_mm needs contiguous tensors")
        self._mm(
            _P(x.data_ptr()), _I64(k),
            _P(starts.data_ptr()), _P(ends.data_ptr()), _P(active.data_ptr()), _I64(len(spans)),
            _P(w.data_ptr()), _I64(out.shape[1]), _P(out.data_ptr()),
            ctypes.c_int(torch.get_num_threads()),
        )  # fmt: skip

    def paged_decode_applies(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> bool:
        """q [T, H, D]; k_cache [N, B, Hkv, D]: float32 on the CPU, within the kernel's sizes."""
        _, b, _, d = k_cache.shape
        return (
            q.device.type == "cpu"
            and q.dtype == k_cache.dtype == torch.float32
            and k_cache.is_contiguous()
            and v_cache.is_contiguous()
            and q.shape[1] <= self.max_heads
            and d <= self.max_head_dim
            and q.shape[1] * d <= self.max_heads_x_dim
            and d % self.head_dim_multiple == 0
            and b <= self.max_block_size
        )

    def paged_decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        ctx_lens: torch.Tensor,
        starts: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """q [n, H, D] (one token per sequence) -> [n, H, D]; keys at positions
        [starts[i], ctx_lens[i]) of sequence i, found through block_tables [n, max_blocks]."""
        n, h, d = q.shape
        _, b, hkv, _ = k_cache.shape
        q = q.contiguous()
        tables = block_tables.to(torch.int64).contiguous()
        lens = ctx_lens.to(torch.int64).contiguous()
        starts = starts.to(torch.int64).contiguous()
        out = torch.empty_like(q)
        self._attn(
            _P(q.data_ptr()), _P(k_cache.data_ptr()), _P(v_cache.data_ptr()),
            _P(tables.data_ptr()), _I64(tables.shape[1]), _P(lens.data_ptr()),
            _P(starts.data_ptr()), _I64(n), _I64(h), _I64(hkv), _I64(d), _I64(b),
            ctypes.c_float(scale), _P(out.data_ptr()), ctypes.c_int(torch.get_num_threads()),
        )  # fmt: skip
        return out


def applies(w: torch.Tensor) -> bool:
    """Whether an input-major [E, K, N] weight can be packed for the kernel here."""
    return (
        w.device.type == "cpu"
        and w.dtype == torch.float32
        and w.shape[-1] % PANEL == 0
        and load() is not None
    )


def pack(w: torch.Tensor) -> torch.Tensor:
    """Input-major [E, K, N] -> panels [E, N/P, K, P] (each panel one contiguous stream)."""
    e, k, n = w.shape
    return w.reshape(e, k, n // PANEL, PANEL).permute(0, 2, 1, 3).contiguous()


def panel_matmul(x: torch.Tensor, panels: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ one expert's panels [N/P, K, P] -> [M, N], with torch (MKL) batched matmuls."""
    return torch.matmul(x, panels).permute(1, 0, 2).reshape(x.shape[0], -1)


@functools.cache
def load() -> CpuKernels | None:
    """The kernels, built if needed; None where they cannot be (callers fall back to torch)."""
    if os.environ.get("MOESERVE_CPU_KERNEL", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        logger.info("no C compiler: no CPU kernels, plain torch is used instead")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
        if lib.moeserve_panel_width() != PANEL:
            raise RuntimeError("panel width of the built kernel differs from PANEL")
        return CpuKernels(lib)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        logger.warning("CPU kernels unavailable (%s): plain torch is used instead", e)
        return None


def _build(compiler: str) -> Path:
    key = hashlib.sha256()
    for part in (*(src.read_bytes() for src in SOURCES), " ".join(FLAGS).encode()):
        key.update(part)
    key.update(_compiler_id(compiler) + _cpu_id())
    out = _cache_dir() / f"moeserve-cpu-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename: concurrent builders (replicas, shards) never see a
    # half-written library
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [compiler, *FLAGS, *map(str, SOURCES), "-o", tmp, "-lm"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moeserve" / "kernels"


def _compiler_id(compiler: str) -> bytes:
    version = subprocess.run([compiler, "--version"], capture_output=True, timeout=30).stdout
    return (version.splitlines() or [compiler.encode()])[0]


def _cpu_id() -> bytes:
    """This CPU's model name and feature flags (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        import platform

        return platform.processor().encode()
    wanted = [ln for ln in lines if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(wanted)).encode()
