"""The environment variables the CPU kernels read, in one place, typed.

- MOESERVE_CPU_KERNEL: "0" turns the C kernels off (plain torch everywhere); default on.
- MOESERVE_KERNEL_BLOCKING: forced blocking choices, "mr=8,kc=0,qt=4,mkl_rows=48" (any
  subset; see tuning.py); empty = chosen for this CPU.
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
    compiler: str
    cache_dir: Path


def read() -> KernelSettings:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return KernelSettings(
        enabled=os.environ.get("MOESERVE_CPU_KERNEL", "1") != "0",
        forced_blocking=os.environ.get("MOESERVE_KERNEL_BLOCKING", ""),
        compiler=os.environ.get("CC", "cc"),
        cache_dir=Path(base) / "moeserve" / "kernels",
    )
