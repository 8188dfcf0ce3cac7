"""What the kernel tests share: kernels built for this CPU or for the other vector width."""

from __future__ import annotations

import shutil
from contextlib import contextmanager

import pytest

from serve_app.kernels import tuning

WIDTHS = ["native", "other width"]


@contextmanager
def built(width: str, load):
    """`load()` (a functools.cache'd kernel loader) as built for this CPU ("native"), or for
    the other vector width (8 or 16 floats: AVX2's registers or AVX-512's), so both code paths
    are checked on whichever CPU runs the tests."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine: the engine falls back to torch")
    with pytest.MonkeyPatch.context() as mp:
        if width == "other width":
            mp.setenv("MOESERVE_KERNEL_VL", "8" if tuning.cpu_info().avx512 else "16")
        load.cache_clear()
        k = load()
        assert k is not None, "a C compiler is here but the kernel did not build (see the log)"
        yield k
    load.cache_clear()
