"""The machine beside every figure: CPU model and the flags that matter, cores, load, and a
measured memory read bandwidth.

Decode of a model far larger than the last-level cache is bound by how fast the weights stream
from memory, and bf16 / int8 / int4 pay off by the bytes they save: a figure means little
without the bandwidth and the vector units of the machine that produced it.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Iterable
from typing import NamedTuple

# The /proc/cpuinfo flags that decide which kernels run: AVX2 / AVX-512 widths, VNNI (int8 dot
# products), AVX-512 BF16 and AMX (bf16 / int8 tiles).
FLAGS_THAT_MATTER = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


def cpu_flags(all_flags: Iterable[str]) -> list[str]:
    """FLAGS_THAT_MATTER present in all_flags, in that order."""
    have = set(all_flags)
    return [f for f in FLAGS_THAT_MATTER if f in have]


class CpuInfo(NamedTuple):
    model: str
    flags: list[str]  # only FLAGS_THAT_MATTER


def parse_cpuinfo(text: str) -> CpuInfo:
    """The first processor's model name and flags from /proc/cpuinfo's text."""
    model, flags = "unknown", []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key == "flags" and not flags:
            flags = cpu_flags(value.split())
    return CpuInfo(model, flags)


def read_cpuinfo() -> CpuInfo:
    try:
        with open("/proc/cpuinfo") as f:
            return parse_cpuinfo(f.read())
    except OSError:
        return CpuInfo(platform.processor() or "unknown", [])


def loadavg() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:
        return (0.0, 0.0, 0.0)


def read_bandwidth_gbs(size_bytes: int = 1 << 30, threads: int = 2, repeats: int = 5) -> float:
    """Streaming-read bandwidth in GB/s: the best of `repeats` torch sums over a float32 tensor
    of size_bytes with `threads` threads (a quick probe, not STREAM). The tensor is 32x a
    32 MB L3, so every pass comes from memory."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        x = torch.ones(size_bytes // 4, dtype=torch.float32)
        x.sum()  # first touch, page faults: untimed
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            x.sum()
            best = min(best, time.perf_counter() - t0)
        del x
        return size_bytes / best / 1e9 if best > 0 else 0.0
    finally:
        torch.set_num_threads(before)


def machine_info(vllm_version: str | None, bandwidth: bool = True) -> dict:
    """Everything the bench JSON records about the machine (and the libraries)."""
    import torch
    import transformers

    from serve_app.bench.vllm_baseline import usable_cpus
    from serve_app.kernels import cpu as cpu_kernels

    kernels = cpu_kernels.load()
    cpu = read_cpuinfo()
    cpus = usable_cpus()
    return {
        "kernel_blocking": str(kernels.blocking) if kernels is not None else None,
        "cpu_count": os.cpu_count(),
        "cpus_usable": cpus,
        "cpu_model": cpu.model,
        "cpu_flags": cpu.flags,
        "loadavg": list(loadavg()),
        # NOTE: measured with as many threads as the engines get (at most 2 on the bench VMs)
        "read_bandwidth_gbs": read_bandwidth_gbs(threads=min(2, cpus)) if bandwidth else None,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "vllm_version": vllm_version,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def machine_line(m: dict) -> str:
    """One header line for tables and plots."""
    bw = m.get("read_bandwidth_gbs")
    load = m.get("loadavg") or [0.0]
    return (
        f"{m.get('cpu_model', 'unknown')}, {m.get('cpus_usable')} cores usable, "
        f"flags {' '.join(m.get('cpu_flags') or []) or 'none of interest'}, "
        f"read bandwidth {'n/a' if bw is None else f'{bw:.1f} GB/s'}, load1m {load[0]:.1f}"
    )
