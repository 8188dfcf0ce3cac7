"""Blocking choices for the CPU kernels: derived from the caches and ISA, forced by a string."""

from __future__ import annotations

import pytest

from serve_app.kernels import tuning
from serve_app.kernels.tuning import Blocking, CpuInfo


def test_blocking_follows_the_cpu():
    epyc = tuning.from_cpu(CpuInfo(l1d=48 << 10, l2=1 << 20, l3=32 << 20, avx512=True))
    old = tuning.from_cpu(CpuInfo(l1d=32 << 10, l2=256 << 10, l3=8 << 20, avx512=False))
    assert epyc == Blocking(mr=8, kc=4096, qt=64, mkl_rows=tuning.NEVER)
    # AVX2: fewer registers, a smaller L2 holds shorter panel chunks and fewer query rows
    assert old == Blocking(mr=3, kc=1024, qt=32, mkl_rows=tuning.NEVER)
    assert old.query_tile(group=2) == 32 and epyc.query_tile(group=8) == 8


def test_cpu_info_reads_sysfs(tmp_path):
    for i, (level, kind, size) in enumerate([(1, "Data", "48K"), (2, "Unified", "2048K")]):
        d = tmp_path / f"index{i}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    info = tuning.cpu_info(tmp_path)
    assert (info.l1d, info.l2, info.l3) == (48 << 10, 2 << 20, 32 << 20)  # l3: the default


def test_forced_blocking_replaces_named_fields():
    base = Blocking(mr=8, kc=4096, qt=64, mkl_rows=0)
    assert tuning.apply_forced(base, "") == base
    assert tuning.apply_forced(base, "mr=4, mkl_rows=48") == Blocking(4, 4096, 64, 48)


@pytest.mark.parametrize("bad", ["mr", "nb=3", "mr=0", "mr=13", "kc=10", "qt=65", "mkl_rows=-1"])
def test_bad_blocking_is_rejected(bad):
    with pytest.raises(ValueError):
        tuning.apply_forced(Blocking(8, 0, 64, 0), bad)


def test_measured_value_is_cached(tmp_path):
    calls = []
    path = tmp_path / "sub" / "value"
    assert tuning.cached_value(path, lambda: calls.append(1) or 48) == 48
    assert tuning.cached_value(path, lambda: calls.append(1) or 0) == 48
    assert calls == [1]
