"""What the kernel tests share: kernels built for this CPU or for the other vector width."""

from __future__ import annotations

import shutil
from contextlib import contextmanager

import pytest

from serve_app.experts.quantized import QuantExpertWeights
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


def count_fused(monkeypatch, fused: bool) -> list[bool]:
    """Record what QuantExpertWeights.mlp_into answers; with fused False it declines, so
    run_experts takes the grouped calls (the LoRA path's)."""
    calls: list[bool] = []
    real = QuantExpertWeights.mlp_into

    def mlp_into(self, *args):
        calls.append(fused and real(self, *args))
        return calls[-1]

    monkeypatch.setattr(QuantExpertWeights, "mlp_into", mlp_into)
    return calls
