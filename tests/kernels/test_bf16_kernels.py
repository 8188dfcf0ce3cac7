"""bf16 weights (engine.dtype bfloat16 on the CPU): the quantized kernel's bf16 panels against
x @ w.float().T at both vector widths and under several blockings (K not a multiple of the
chunk), the bf16 dense linear and experts on the kernel and on torch, and what bfloat16 resolves to.
Where the CPU has avx512_bf16 the native build multiplies with vdpbf16ps, the activations
rounded to bf16 (fp32 accumulation): the reference rounds them too there."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from serve_app.experts.local import run_experts
from serve_app.experts.quantized import QuantExpertWeights
from serve_app.kernels import quant as quant_kernel
from serve_app.kernels.tuning import Blocking
from serve_app.model.quant.linear import Bf16Linear
from serve_app.model.quant.precision import precision
from serve_app.model.quant.scheme import Quantization, quantize
from tests.kernels.conftest import WIDTHS, built, count_fused
from tests.kernels.test_quant_kernels import _expert_reference, _rand

BF16 = Quantization("bf16")
BLOCKINGS = [None, Blocking(mr=1, kc=16, qt=1, mkl_rows=0), Blocking(12, 64, 1, 0)]


def _has_avx512_bf16() -> bool:
    try:
        return " avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.fixture(scope="module", params=WIDTHS)
def kernel(request):
    """(kernel, whether it rounds the activations to bf16: vdpbf16ps, native width only)."""
    with built(request.param, quant_kernel.load) as k:
        yield k, request.param == "native" and _has_avx512_bf16()


def _ref_x(x: torch.Tensor, dp: bool) -> torch.Tensor:
    return x.bfloat16().float() if dp else x


@pytest.mark.parametrize("blocking", BLOCKINGS)
def test_bf16_panels_match_widened_matmul(kernel, blocking):
    """Spans of 1 to 13 rows (past every row tile), one expert with none."""
    k_, dp = kernel
    e, n, k = 4, 64, 194  # K: pairs, not a multiple of the K chunks
    w = quantize(_rand(e, n, k) * 0.1, BF16, "w")
    panels = quant_kernel.pack_bf16(w.w)
    assert panels.nbytes == w.w.nbytes and torch.equal(quant_kernel.unpack_bf16(panels[1]), w.w[1])
    x = _rand(24, k, seed=1)
    spans = [(2, 0, 1), (0, 1, 14), (3, 14, 24)]
    run = copy.copy(k_)
    run.blocking = blocking or k_.blocking
    out = torch.full((24, n), float("nan"))
    run.grouped_mm_bf16(x, panels, spans, out)
    xr, wf = _ref_x(x, dp).double(), w.w.double()
    ref = torch.cat([xr[s:end] @ wf[local].T for local, s, end in spans])
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


def test_bf16_linear_on_the_kernel_and_on_torch(kernel):
    k_, dp = kernel
    for n, path in ((64, "kernel"), (40, "dequant")):
        w, b = _rand(n, 256) * 0.1, _rand(n, seed=4)
        q = quantize(w, BF16, "w")
        layer = Bf16Linear(q, b, torch.float32)
        assert layer.path == path
        x = _rand(2, 5, 256, seed=5)
        ref = F.linear(_ref_x(x, dp and path == "kernel"), q.dequantize(), b)
        torch.testing.assert_close(layer(x), ref, atol=2e-5, rtol=1e-4)
        assert torch.equal(layer.dequantized(), w.bfloat16().float())
        assert layer.weight_bytes <= w.nbytes / 2 + b.nbytes


@pytest.mark.parametrize("fused", [True, False], ids=["one-region MLP", "grouped calls"])
def test_bf16_experts_packed_and_in_torch(kernel, fused, monkeypatch):
    _, dp = kernel
    e, inter, d = 4, 64, 128
    w13, w2 = _rand(e, 2 * inter, d) * 0.1, _rand(e, d, inter, seed=1) * 0.1
    x = _rand(9, d, seed=2)
    ids = torch.tensor([[0, 3], [1, 3], [3, 0], [2, 1]] * 2 + [[1, 2]])
    weights = torch.rand(9, 2, generator=torch.Generator().manual_seed(3))
    packed = QuantExpertWeights.quantize(w13, w2, list(range(e)), BF16, torch.float32, 0)
    assert packed.w13.packed and packed.w2.packed
    assert packed.nbytes == (w13.nbytes + w2.nbytes) // 2
    ref = _expert_reference(w13.bfloat16().float(), w2.bfloat16().float(), x, ids, weights)
    calls = count_fused(monkeypatch, fused)
    y = run_experts(packed, x, ids, weights)
    assert calls == [fused and not dp]  # avx512_bf16's tiles: the grouped calls only
    tol = dict(atol=2e-2, rtol=2e-2) if dp else dict(atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(y.double(), ref, **tol)
    regrouped = packed.select([2, 3]).concat(packed.select([0, 1]))
    torch.testing.assert_close(run_experts(regrouped, x, ids, weights), y)
    quant_kernel.load.cache_clear()
    monkeypatch.setenv("MOESERVE_CPU_KERNEL", "0")
    try:
        plain = QuantExpertWeights.quantize(w13, w2, list(range(e)), BF16, torch.float32, 0)
        assert not plain.w13.packed
        torch.testing.assert_close(run_experts(plain, x, ids, weights).double(), ref, **tol)
    finally:
        quant_kernel.load.cache_clear()


def test_bfloat16_on_the_cpu_is_bf16_weights_and_float32_compute(monkeypatch):
    cpu, none = torch.device("cpu"), Quantization()
    p = precision(torch.bfloat16, cpu, none)
    assert (p.compute, p.weights.method) == (torch.float32, "bf16")
    assert p.weights.tag() == "bf16"  # in the model digest: never shares KV with float32
    # float32, a weight quantization, or no kernel: the dtype is the compute dtype
    assert precision(torch.float32, cpu, none) == (p := precision(torch.float32, cpu, none))
    assert p.compute == torch.float32 and not p.weights.enabled
    int8 = precision(torch.bfloat16, cpu, Quantization("int8"))
    assert (int8.compute, int8.weights.method) == (torch.bfloat16, "int8")
    quant_kernel.load.cache_clear()
    monkeypatch.setenv("MOESERVE_CPU_KERNEL", "0")
    try:
        assert precision(torch.bfloat16, cpu, none).compute == torch.bfloat16
    finally:
        quant_kernel.load.cache_clear()
