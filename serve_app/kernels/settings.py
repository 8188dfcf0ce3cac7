"""The environment variables the CPU kernels read, in one place, typed.

- MOESERVE_CPU_KERNEL: "0" turns the C kernels off (plain torch everywhere); default on.
- MOESERVE_KERNEL_BLOCKING: forced blocking choices, "mr=8,kc=0,qt=4,mkl_rows=48" (any
  subset; see tuning.py); empty = chosen for this CPU.
- MOESERVE_KERNEL_VL: floats per vector the kernels are built for, "8" or "16"; empty = this
  CPU's registers (16 with AVX-512, else 8). The other width is correct but slow: for tests.
- CC: the C compiler (default `cc`, then `gcc`).
- XDG_CACHE_HOME: where the built kernels and the calibration live (default ~/.cache).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class KernelSettings:
    enabled: bool
    forced_blocking: str
    vector_lanes: int | None
    compiler: str
    cache_dir: Path


def read() -> KernelSettings:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return KernelSettings(
        enabled=os.environ.get("MOESERVE_CPU_KERNEL", "1") != "0",
        forced_blocking=os.environ.get("MOESERVE_KERNEL_BLOCKING", ""),
        vector_lanes=_lanes(os.environ.get("MOESERVE_KERNEL_VL", "")),
        compiler=os.environ.get("CC", "cc"),
        cache_dir=Path(base) / "moeserve" / "kernels",
    )


def _lanes(text: str) -> int | None:
    if not text.strip():
        return None
    if text.strip() not in ("8", "16"):
        raise ValueError(f"MOESERVE_KERNEL_VL must be 8 or 16, got {text!r}")
    return int(text)
