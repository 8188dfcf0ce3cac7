"""Run-time choice of device and dtype, and process-level tuning (allocator, thread names).
Never assumes CUDA."""

from __future__ import annotations

import functools

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """auto | cpu | cuda | cuda:N; auto takes CUDA only when torch sees a device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but torch sees no CUDA device")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA, fp32 on CPU (bf16 matmuls are slower than fp32 on most CPUs)."""
    if name != "auto":
        return _DTYPES[name]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def tune_host_allocator() -> bool:
    """Keep glibc from returning big freed buffers to the OS after every layer.

    Per-step temporaries of tens of MB (attention contexts, expert activations) otherwise go
    through mmap/munmap each time: millions of page faults and a third of the step in the
    kernel on long contexts. Returns False where glibc's mallopt is not available.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    ok = mallopt(m_mmap_threshold, 32 << 20)  # the largest glibc accepts on 64-bit
    ok &= mallopt(m_trim_threshold, 1 << 30)
    ok &= mallopt(m_top_pad, 256 << 20)
    return bool(ok)


def name_os_thread(name: str) -> bool:
    """Give the calling thread an OS-visible name (Linux: /proc/<pid>/task/<tid>/comm, 15
    bytes), so profilers and the serving benchmark's CPU split can tell the engine thread from
    the event loop around it. Python 3.11 does not pass Thread.name on. False where unsupported."""
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        pr_set_name = 15
        return _libc().prctl(pr_set_name, name.encode()[:15], 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


@functools.cache
def _libc():
    """libc through ctypes, looked up once (find_library runs `ldconfig -p` in a subprocess)."""
    import ctypes
    import ctypes.util

    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
