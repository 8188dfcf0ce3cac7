"""The LoRA gather kernel (csrc/lora_mm.c) against plain torch, for both vector widths: mixed
ranks, interleaved and contiguous adapters, routed experts, column-slice outputs, sizes off
the vector width, the parallel path; rows of the base model (or of an adapter that does not
adapt the module) are left exactly as they were. And LoraBatch gives the same deltas with the
kernel as with its torch fallback (MOESERVE_CPU_KERNEL=0), and with a rank above the kernel's
(which runs torch)."""

from __future__ import annotations

import pytest
import torch

from serve_app.kernels import lora as lora_kernel
from serve_app.lora.batch import LoraBatch
from serve_app.lora.peft_format import ExpertLoraWeights, LoraAdapter, LoraWeights
from tests.kernels.conftest import WIDTHS, built


def reference(x, slots, experts, factors, out):
    """out[r] + x[r] @ A[s, e].T @ Bt[s, e], row by row."""
    want = out.clone()
    for r in range(x.shape[0]):
        s = int(slots[r])
        if s < 0 or factors[s] is None:
            continue
        e = 0 if experts is None else int(experts[r])
        want[r] += (x[r] @ factors[s].a[e].T) @ factors[s].bt[e]
    return want


def random_factors(ranks, k, n, e=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for r in ranks:
        if r is None:
            out.append(None)
            continue
        lead = () if e is None else (e,)
        a = torch.randn(*lead, r, k, generator=gen)
        b = torch.randn(*lead, n, r, generator=gen)
        out.append(lora_kernel.pack(a, b))
    return out


# (rows, K, N, ranks per slot (None: the module is not adapted), slot of each row by rule)
CASES = {
    "decode interleaved, mixed ranks": (24, 64, 48, [16, 8, 1, 5, None, 64], "interleaved"),
    "prefill contiguous, tails": (37, 70, 29, [3, 16, 7], "contiguous"),
    "parallel region": (512, 128, 160, [64, 32], "contiguous"),
}


def slots_for(rows, n_slots, rule, gen):
    if rule == "interleaved":
        s = torch.arange(rows) % (n_slots + 1) - 1  # -1: a base-model row every n_slots + 1
    else:
        s = torch.arange(rows) * n_slots // rows
        s[torch.randint(0, rows, (rows // 5,), generator=gen)] = -1
    return s.to(torch.int64).contiguous()


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_linear_bgmv_matches_torch(width, case):
    rows, k, n, ranks, rule = CASES[case]
    gen = torch.Generator().manual_seed(1)
    factors = random_factors(ranks, k, n)
    slots = slots_for(rows, len(ranks), rule, gen)
    x = torch.randn(rows, k + 3, generator=gen)[:, 1 : k + 1]  # a row stride wider than K
    wide = torch.randn(rows, n + 9, generator=gen)
    out = wide[:, 4 : 4 + n]  # a column slice, as q / k / v of one packed projection
    want = reference(x, slots, None, factors, out)
    before = wide.clone()
    with built(width, lora_kernel.load) as kernel:
        assert kernel.applies(x, out)
        kernel.bgmv_(x, slots, None, factors, out)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-3)
    untouched = torch.tensor([s < 0 or factors[s] is None for s in slots.tolist()])
    assert untouched.any()
    assert torch.equal(wide[untouched], before[untouched])  # base rows: bit for bit
    assert torch.equal(wide[:, :4], before[:, :4]) and torch.equal(
        wide[:, 4 + n :], before[:, 4 + n :]
    )


@pytest.mark.parametrize("width", WIDTHS)
def test_expert_bgmv_matches_torch(width):
    rows, k, n, e = 40, 48, 80, 6
    gen = torch.Generator().manual_seed(2)
    factors = random_factors([8, None, 16, 4], k, n, e=e)
    slots = slots_for(rows, 4, "interleaved", gen)
    experts = torch.sort(torch.randint(0, e, (rows,), generator=gen)).values.contiguous()
    x = torch.randn(rows, k, generator=gen)
    out = torch.randn(rows, n, generator=gen)
    want = reference(x, slots, experts, factors, out)
    with built(width, lora_kernel.load) as kernel:
        kernel.bgmv_(x, slots, experts, factors, out)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-3)


def _adapter(i: int, rank: int, k: int, n: int, e: int) -> LoraAdapter:
    gen = torch.Generator().manual_seed(10 + i)
    lin = {
        "m": LoraWeights(torch.randn(rank, k, generator=gen), torch.randn(n, rank, generator=gen))
    }
    ex = {(0, "down"): ExpertLoraWeights(torch.randn(e, rank, k, generator=gen),
                                         torch.randn(e, n, rank, generator=gen))}  # fmt: skip
    return LoraAdapter(f"a{i}", "", str(i), rank, lin if i != 2 else {}, ex)


@pytest.mark.parametrize("ranks", [(4, 16, 8), (4, 300, 8)])  # 300: above the kernel's, torch
def test_lora_batch_kernel_matches_its_torch_fallback(monkeypatch, ranks):
    k, n, e, rows = 32, 24, 4, 18
    adapters = [_adapter(i, r, k, n, e) for i, r in enumerate(ranks)]
    per_row = [None if r % 5 == 0 else adapters[r % 3] for r in range(rows)]
    batch = LoraBatch.build(per_row, torch.device("cpu"))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(rows, k, generator=gen)
    token_idx = torch.arange(rows).repeat_interleave(2)
    expert_ids = torch.randint(0, e, (2 * rows,), generator=gen)
    xs = x[token_idx]

    def deltas():
        y, ye = torch.zeros(rows, n), torch.zeros(2 * rows, n)
        batch.add_linear_("m", x, y)
        batch.experts(0).add_("down", xs, token_idx, expert_ids, ye)
        return y, ye

    with built("native", lora_kernel.load):
        fast = deltas()
    monkeypatch.setenv("MOESERVE_CPU_KERNEL", "0")
    lora_kernel.load.cache_clear()
    try:
        assert lora_kernel.load() is None
        slow = deltas()
    finally:
        lora_kernel.load.cache_clear()
    for got, want in zip(fast, slow, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(fast[0][0], torch.zeros(n))  # row 0 runs the base model
