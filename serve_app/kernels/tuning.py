"""Blocking of the CPU kernels, chosen for the CPU at hand rather than fixed for one machine.

Three choices come from the caches and the vector ISA (read from sysfs and /proc/cpuinfo):
- `mr`, rows per register tile of the grouped matmul: 8 with AVX-512's 32 vector registers
  (16 accumulators + 2 panel vectors; 12 rows measured no faster), 3 with AVX2's 16 (a
  16-float vector is two registers there);
- `kc`, the K chunk of the grouped matmul: a 32-column panel chunk of kc rows fills half of
  L2, so it stays there while every row tile of the expert passes over it (chunks sized for
  L1 measured 10-25% slower on a Zen core: each chunk reloads and re-stores the outputs);
- `qt`, query tokens per prefill attention task: as many as the kernel holds (64 query rows)
  when its ~280 KB of scratch fits in L2, half as many otherwise.
One is measured, once per machine, and cached beside the compiled kernels:
- `mkl_rows`: above how many rows an expert's matmul goes to torch (MKL) instead of the C
  kernel. On an Intel Xeon MKL won above ~48 rows; on AMD EPYC it runs a slower code path and
  the C kernel wins at every size (docs/benchmarks.md), so the answer depends on the machine.

`MOESERVE_KERNEL_BLOCKING` (see `settings.py`) forces any of them, e.g. `mr=8,kc=0,qt=4,
mkl_rows=48` (kc=0: the whole K; mkl_rows=0: never MKL), so a benchmark can be rerun on the
other choices.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

MAX_ROW_TILE = 12  # must match MAX_MR in csrc/grouped_mm.c
MAX_QUERY_ROWS = 64  # must match MAX_R in csrc/paged_prefill.c
PREFILL_SCRATCH_BYTES = 160 * 1024  # sizeof(Scratch) in csrc/paged_prefill.c, rounded up
NEVER = 0  # mkl_rows: the C kernel runs every expert group


@dataclass(frozen=True, slots=True)
class Blocking:
    mr: int  # rows per register tile of grouped_mm, 1..MAX_ROW_TILE
    kc: int  # K chunk of grouped_mm; 0 = all of K at once
    qt: int  # query tokens per paged_prefill task; capped at MAX_QUERY_ROWS // heads per KV head
    mkl_rows: int  # expert groups with more rows run torch matmuls; NEVER = always the kernel

    def __post_init__(self) -> None:
        if not 1 <= self.mr <= MAX_ROW_TILE:
            raise ValueError(f"mr must be in 1..{MAX_ROW_TILE}, got {self.mr}")
        if self.kc < 0 or self.kc % 16:
            raise ValueError(f"kc must be 0 or a positive multiple of 16, got {self.kc}")
        if not 1 <= self.qt <= MAX_QUERY_ROWS:
            raise ValueError(f"qt must be in 1..{MAX_QUERY_ROWS}, got {self.qt}")
        if self.mkl_rows < 0:
            raise ValueError(f"mkl_rows must be >= 0, got {self.mkl_rows}")

    def query_tile(self, group: int) -> int:
        """Query tokens per prefill task for `group` query heads per KV head."""
        return max(1, min(self.qt, MAX_QUERY_ROWS // group))


class CpuInfo(NamedTuple):
    l1d: int  # bytes per core
    l2: int  # bytes per core
    l3: int  # bytes, shared
    avx512: bool


def cpu_info(sysfs: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> CpuInfo:
    """Cache sizes of core 0 and whether it has AVX-512; common defaults where unreadable."""
    sizes = {"1Data": 32 << 10, "2Unified": 1 << 20, "3Unified": 32 << 20}
    for index in sysfs.glob("index*"):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            sizes[level + kind] = _parse_size((index / "size").read_text().strip())
        except (OSError, ValueError):
            continue
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    return CpuInfo(sizes["1Data"], sizes["2Unified"], sizes["3Unified"], " avx512f" in flags)


def from_cpu(info: CpuInfo, mkl_rows: int = NEVER) -> Blocking:
    """The blocking this CPU's caches and registers suggest (pure: tests pass other CPUs)."""
    panel_row = 32 * 4  # bytes of one K row of a 32-column float32 panel
    kc = max(64, (info.l2 // 2 // panel_row) // 16 * 16)
    qt = MAX_QUERY_ROWS if info.l2 >= 2 * PREFILL_SCRATCH_BYTES else MAX_QUERY_ROWS // 2
    return Blocking(mr=8 if info.avx512 else 3, kc=kc, qt=qt, mkl_rows=mkl_rows)


def apply_forced(base: Blocking, forced: str) -> Blocking:
    """`base` with the fields named in "mr=8,kc=0,..." replaced; ValueError on a bad string."""
    if not forced.strip():
        return base
    names = {f.name for f in dataclasses.fields(Blocking)}
    changes = {}
    for part in forced.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep or name not in names:
            raise ValueError(f"bad blocking {part!r}: expected NAME=INT with NAME in {names}")
        changes[name] = int(value)
    return dataclasses.replace(base, **changes)


def _parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1:].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


def cached_value(path: Path, measure) -> int:
    """An int measured once and kept in `path` (a concurrent measurer just overwrites it)."""
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        pass
    value = int(measure())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(str(value))
    os.replace(tmp, path)
    return value
