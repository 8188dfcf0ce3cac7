"""Weight-only quantization: the schemes' rounding, the quantized expert kernel (int8 and int4,
dequantized in registers) and the quantized dense linears (torch's int8 / int4 CPU ops), each
against x @ dequant(W).T, under more than one blocking; and the torch fallbacks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from serve_app.experts.local import run_experts
from serve_app.experts.quantized import QuantExpertWeights
from serve_app.kernels import quant as quant_kernel
from serve_app.kernels.tuning import Blocking
from serve_app.model.quant.linear import Int4Linear, Int8Linear
from serve_app.model.quant.scheme import Quantization, QuantizationError, quantize
from tests.kernels.conftest import WIDTHS, built, count_fused

SCHEMES = [Quantization("int8"), Quantization("int4"), Quantization("int4", 32)]
BLOCKINGS = [None, Blocking(mr=1, kc=16, qt=1, mkl_rows=0), Blocking(12, 64, 1, 0)]
D, INTER = 128, 96  # 2 * INTER and D are panel multiples


@pytest.fixture(scope="module", params=WIDTHS)
def kernel(request):
    """Built for this CPU, and for the other vector width."""
    with built(request.param, quant_kernel.load) as k:
        yield k


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("quant", SCHEMES, ids=lambda q: q.tag())
def test_rounding_is_within_half_a_step(quant):
    w = _rand(3, 64, 256)
    q = quantize(w, quant, "w")
    err = (q.dequantize() - w).abs()
    if quant.method == "int8":
        assert q.q.dtype == torch.int8 and q.q.abs().max() == 127
        assert (err <= q.scale[..., None] / 2 + 1e-6).all()
    else:
        g = quant.group_size or 128
        assert q.group == g and q.scale.shape == (3, 64, 256 // g)
        assert q.q.max() == 15 and q.q.min() == 0
        step = q.scale.repeat_interleave(g, -1)
        assert (err <= step / 2 + 1e-6).all()


def test_int4_picks_the_largest_group_that_divides_k_and_refuses_others():
    assert Quantization("int4").group_for(192, "w") == 64
    assert Quantization("int4").group_for(96, "w") == 32
    with pytest.raises(QuantizationError, match="w has 80 inputs"):
        Quantization("int4").group_for(80, "w")
    with pytest.raises(QuantizationError, match="group size 128"):
        Quantization("int4", 128).group_for(192, "w")


@pytest.mark.parametrize("blocking", BLOCKINGS)
@pytest.mark.parametrize("quant", SCHEMES, ids=lambda q: q.tag())
def test_grouped_kernel_matches_dequantized_matmul(kernel, quant, blocking):
    """Spans of 1 to 13 rows (past every row tile), one expert with none."""
    e, n, k = 4, 64, 192
    w = quantize(_rand(e, n, k) * 0.1, quant, "w")
    x = _rand(24, k, seed=1)
    spans = [(2, 0, 1), (0, 1, 14), (3, 14, 24)]
    run = copy.copy(kernel)
    run.blocking = blocking or kernel.blocking
    out = torch.full((24, n), float("nan"))
    if quant.method == "int8":
        run.grouped_mm_int8(x, quant_kernel.pack_int8(w.q), w.scale, spans, out)
    else:
        panels, sz = quant_kernel.pack_int4(w.q, w.scale, w.zero)
        run.grouped_mm_int4(x, panels, sz, w.group, spans, out)
    deq = w.dequantize()
    ref = torch.cat([x[s:end] @ deq[local].T for local, s, end in spans])
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def _expert_reference(w13, w2, x, ids, weights):
    """float64, token by token, over the float weights given ([E, 2I, D] and [E, D, I])."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gate, up = (w13[e].double() @ x[t].double()).chunk(2)
            out[t] += weights[t, j].double() * (w2[e].double() @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("fused", [True, False], ids=["one-region MLP", "grouped calls"])
@pytest.mark.parametrize("quant", SCHEMES, ids=lambda q: q.tag())
def test_quantized_experts_match_dequantized_experts_packed_and_in_torch(
    kernel, quant, fused, monkeypatch
):
    e = 4
    w13, w2 = _rand(e, 2 * INTER, D) * 0.1, _rand(e, D, INTER, seed=1) * 0.1
    x = _rand(9, D, seed=2)
    ids = torch.tensor([[0, 3], [1, 3], [3, 0], [2, 1]] * 2 + [[1, 2]])
    weights = torch.rand(9, 2, generator=torch.Generator().manual_seed(3))
    packed = QuantExpertWeights.quantize(w13, w2, list(range(e)), quant, torch.float32, 0)
    assert packed.w13.packed and packed.w2.packed
    calls = count_fused(monkeypatch, fused)
    reference = _expert_reference(
        quantize(w13, quant, "w13").dequantize(), quantize(w2, quant, "w2").dequantize(),
        x, ids, weights,
    )  # fmt: skip
    y = run_experts(packed, x, ids, weights)
    assert calls == [fused]  # the path asked for ran
    torch.testing.assert_close(y.double(), reference, atol=2e-5, rtol=1e-4)
    # selection and concatenation (a shard's drops and adds) keep the answers
    regrouped = packed.select([2, 3]).concat(packed.select([0, 1]))
    assert regrouped.expert_ids == [2, 3, 0, 1]
    torch.testing.assert_close(run_experts(regrouped, x, ids, weights), y)
    # and with no kernel: torch over the dequantized experts, the same numbers
    quant_kernel.load.cache_clear()
    monkeypatch.setenv("MOESERVE_CPU_KERNEL", "0")
    try:
        plain = QuantExpertWeights.quantize(w13, w2, list(range(e)), quant, torch.float32, 0)
        assert not plain.w13.packed
        torch.testing.assert_close(run_experts(plain, x, ids, weights), y, atol=2e-5, rtol=1e-4)
        # what each holds: the unpacked int4 layout keeps a value per byte
        assert plain.nbytes == packed.nbytes + (packed.w13.q.nbytes + packed.w2.q.nbytes) * (
            quant.method == "int4"
        )
    finally:
        quant_kernel.load.cache_clear()
    float_bytes = w13.nbytes + w2.nbytes
    # int8: 1 byte a weight + a scale a row; int4: half a byte + 8 bytes of scale and zero a group
    assert packed.nbytes < float_bytes / (3.5 if quant.method == "int8" else 5)


# outputs -> the path each scheme takes on the CPU in float32: the kernel for panel multiples,
# else torch's op where it takes the shape (int4 wants N % 16 == 0), else dequantize + F.linear
PATHS = {64: ("kernel", "kernel"), 48: ("torch_op", "torch_op"), 40: ("torch_op", "dequant")}


@pytest.mark.parametrize("quant", SCHEMES, ids=lambda q: q.tag())
@pytest.mark.parametrize("n", sorted(PATHS))
def test_quantized_linears_match_dequantized_linear_on_every_path(kernel, quant, n):
    k = 256
    w = _rand(n, k) * 0.1
    b = _rand(n, seed=4)
    q = quantize(w, quant, "w")
    layer = (Int8Linear if quant.method == "int8" else Int4Linear)(q, b, torch.float32)
    assert layer.path == PATHS[n][quant.method == "int4"]
    x = _rand(2, 5, k, seed=5)
    torch.testing.assert_close(layer(x), F.linear(x, q.dequantize(), b), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(layer.dequantized(), q.dequantize(), atol=1e-6, rtol=1e-5)
    assert layer.weight_bytes < w.nbytes / 3


@pytest.mark.parametrize("quant", SCHEMES, ids=lambda q: q.tag())
def test_quantized_projections_of_one_input_run_as_one_call_over_shared_panels(
    kernel, quant, monkeypatch
):
    """q / k / v as quantized linears: one fused kernel call (project_group), the same outputs
    as each alone, each member's panels a view into the fused stack (no second copy); a
    member whose bias is None adds zeros."""
    from serve_app.model.layers.linear import project

    k, sizes = 128, (96, 32, 64)
    weights = [quantize(_rand(n, k, seed=i) * 0.1, quant, f"w{i}") for i, n in enumerate(sizes)]
    cls = Int8Linear if quant.method == "int8" else Int4Linear
    biases = [_rand(96, seed=7), None, _rand(64, seed=8)]
    layers = [cls(w, b, torch.float32) for w, b in zip(weights, biases, strict=True)]
    x = _rand(5, k, seed=9)
    alone = [m(x) for m in layers]
    before = sum(m.weight_bytes for m in layers)
    calls = []
    real = type(layers[0].stack).matmul
    monkeypatch.setattr(
        type(layers[0].stack), "matmul", lambda s, *a: calls.append(s) or real(s, *a)
    )
    outs = project(x, *layers)
    assert len(calls) == 1 and calls[0].out_features == sum(sizes)  # one call, the joined stack
    for out, ref, w, b in zip(outs, alone, weights, biases, strict=True):
        torch.testing.assert_close(out, ref)
        want = F.linear(x, w.dequantize(), b)
        torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)
    storage = calls[0].kernel_args[0].untyped_storage().data_ptr()
    for m in layers:  # each member's panels a view into the joined stack, not a copy
        assert m.stack.kernel_args[0].untyped_storage().data_ptr() == storage
    assert sum(m.weight_bytes for m in layers) == before
    # a member alone still runs (through its view) and gives the same answer
    torch.testing.assert_close(layers[1](x), alone[1])
