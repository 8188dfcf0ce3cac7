"""The CPU kernel for expert matmuls (csrc/grouped_mm.c): built on first use, loaded with ctypes.

It is compiled with the system C compiler (`-O3 -march=native -fopenmp`) into a per-user cache
keyed by the source, the flags, the compiler and this CPU's model and flags, so a cache shared
by different machines never hands one of them another's instructions. It links torch's own
libgomp (already loaded), so torch and the kernel share one OpenMP pool.

Nothing to install: with no C compiler, a failed build, or MOESERVE_CPU_KERNEL=0, `load()`
returns None and the experts run torch matmuls instead (same results up to float32 rounding).
Packed weights are [E, N/P, K, P] (P = `PANEL` columns): `pack` / `panel_matmul` below.
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

SOURCE = Path(__file__).with_name("csrc") / "grouped_mm.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared")
PANEL = 32  # must match NB in the C source (checked when it loads)
SMALL_ROWS = 48  # experts with more rows than this are compute-bound: MKL does them better

_P = ctypes.c_void_p
_I64 = ctypes.c_int64


class GroupedMatmul:
    """out[s:e] = x[s:e] @ W[local] for each (local, s, e) span, in one parallel call."""

    def __init__(self, lib: ctypes.CDLL):
        self._fn = lib.moeserve_grouped_mm
        self._fn.restype = None
        self._fn.argtypes = [_P, _I64, _P, _P, _P, _I64, _P, _I64, _P, ctypes.c_int]

    def __call__(
        self, x: torch.Tensor, w: torch.Tensor, spans: list[tuple[int, int, int]], out: torch.Tensor
    ) -> None:
        """x [R, K] and out [R, N] contiguous float32; w packed [E, N/P, K, P]."""
        num_experts, _, k, _ = w.shape
        starts = torch.zeros(num_experts, dtype=torch.int64)
        ends = torch.zeros(num_experts, dtype=torch.int64)
        active = torch.tensor([local for local, _, _ in spans], dtype=torch.int64)
        for local, s, e in spans:
            starts[local], ends[local] = s, e
        if not (x.is_contiguous() and out.is_contiguous() and w.is_contiguous()):
            raise ValueError("grouped_mm needs contiguous tensors")
        self._fn(
            _P(x.data_ptr()), _I64(k),
            _P(starts.data_ptr()), _P(ends.data_ptr()), _P(active.data_ptr()), _I64(len(spans)),
            _P(w.data_ptr()), _I64(out.shape[1]), _P(out.data_ptr()),
            ctypes.c_int(torch.get_num_threads()),
        )  # fmt: skip


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
def load() -> GroupedMatmul | None:
    """The kernel, built if needed; None where it cannot be (the caller falls back to torch)."""
    if os.environ.get("MOESERVE_CPU_KERNEL", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        logger.info("no C compiler: expert matmuls use torch")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
        if lib.moeserve_panel_width() != PANEL:
            raise RuntimeError("panel width of the built kernel differs from PANEL")
        return GroupedMatmul(lib)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        logger.warning("CPU expert kernel unavailable (%s): expert matmuls use torch", e)
        return None


def _build(compiler: str) -> Path:
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), _compiler_id(compiler), _cpu_id()):
        key.update(part)
    out = _cache_dir() / f"grouped_mm-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename: concurrent builders (replicas, shards) never see a
    # half-written library
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120
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
