"""Compiling the CPU kernels (csrc/*.c) into a per-user cache, keyed by the sources, the
flags, the compiler and this CPU's model and flags, so a cache shared by different machines
never hands one of them another's instructions. cpu.py loads what this builds."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from serve_app.kernels.settings import KernelSettings

logger = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
# paged_*_bf16.c: the attention kernels again over a bfloat16 KV cache (csrc/kv_elem.h)
SOURCES = tuple(
    CSRC / f
    for f in (
        "grouped_mm.c",
        "paged_decode.c",
        "paged_prefill.c",
        "rms_norm.c",
        "paged_decode_bf16.c",
        "paged_prefill_bf16.c",
    )
)
HEADERS = (CSRC / "simd.h", CSRC / "kv_elem.h")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared")


def build(
    compiler: str,
    cache_dir: Path,
    vector_lanes: int | None = None,
    sources: tuple[Path, ...] = SOURCES,
    name: str = "moeserve-cpu",
) -> Path:
    """The compiled library of `sources` (default: the float kernels) for these flags, this
    compiler and this CPU: from the cache, or built into it. `vector_lanes` forces the kernels'
    vector width (simd.h), else native."""
    flags = FLAGS if vector_lanes is None else (*FLAGS, f"-DMOESERVE_VL={vector_lanes}")
    key = hashlib.sha256()
    for part in (*(src.read_bytes() for src in (*sources, *HEADERS)), " ".join(flags).encode()):
        key.update(part)
    key.update(_compiler_id(compiler) + _cpu_id())
    out = cache_dir / f"{name}-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename: concurrent builders (replicas, shards) never see a
    # half-written library
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [compiler, *flags, f"-I{CSRC}", *map(str, sources), "-o", tmp, "-lm"],
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


def open_library(
    env: KernelSettings,
    width_symbol: str,
    panel: int,
    sources: tuple[Path, ...] = SOURCES,
    name: str = "moeserve-cpu",
) -> tuple[ctypes.CDLL, Path] | None:
    """A kernel library built (or found in the cache) and loaded, with its panel width checked
    against `panel` through `width_symbol`; None when the kernels are off or there is no C
    compiler. A failed build or load raises (OSError, RuntimeError, SubprocessError)."""
    if not env.enabled:
        return None
    compiler = shutil.which(env.compiler) or shutil.which("gcc")
    if compiler is None:
        logger.info("no C compiler: no %s kernels, plain torch is used instead", name)
        return None
    so = build(compiler, env.cache_dir, env.vector_lanes, sources, name)
    lib = ctypes.CDLL(str(so))
    width = getattr(lib, width_symbol)
    width.restype = ctypes.c_int64
    if width() != panel:
        raise RuntimeError(f"panel width of the built {name} library differs from {panel}")
    return lib, so
