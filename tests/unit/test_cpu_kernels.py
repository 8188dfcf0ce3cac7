"""The CPU kernels against plain torch: the grouped expert matmul (any routing, packed weights
that select and concatenate like experts) and paged decode attention (GQA, windows, ragged
contexts)."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from serve_app.experts.local import ExpertWeights, run_experts
from serve_app.kernels import cpu as cpu_kernel
from serve_app.model.layers.attention import (
    AttentionMetadata,
    DecodeGroup,
    GatherWorkspace,
    paged_attention,
)

D, INTER = 64, 80  # 2 * INTER = 160 and D are panel multiples, INTER alone is not


def _weights(expert_ids: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = len(expert_ids)
    return torch.randn(n, D, 2 * INTER, generator=g) * 0.1, torch.randn(
        n, INTER, D, generator=g
    ) * 0.1


def _reference(w13, w2, expert_ids, x, ids, weights):
    """float64, one token at a time: sum over k of weight * down(silu(gate) * up)."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    local = {e: i for i, e in enumerate(expert_ids)}
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e not in local:
                continue
            gate, up = (x[t].double() @ w13[local[e]].double()).chunk(2)
            out[t] += weights[t, j].double() * ((F.silu(gate) * up) @ w2[local[e]].double())
    return out


@pytest.fixture(scope="module")
def kernel():
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine: the engine falls back to torch matmuls")
    k = cpu_kernel.load()
    assert k is not None, "a C compiler is here but the kernel did not build (see the log)"
    return k


def test_builds_and_packs_here(kernel):
    w13, w2 = _weights([0, 1, 2])
    w = ExpertWeights.build(w13, w2, [0, 1, 2])
    assert w.packed
    assert w.w13.shape == (3, 2 * INTER // cpu_kernel.PANEL, D, cpu_kernel.PANEL)
    assert w.intermediate_size == INTER


@pytest.mark.parametrize("num_tokens", [1, 7, 64, 300])  # 300: some experts take the MKL path
@pytest.mark.parametrize("expert_ids", [[0, 1, 2, 3, 4, 5], [5, 2, 7]])  # a shard, unsorted
def test_packed_matches_torch_and_reference(kernel, num_tokens, expert_ids):
    g = torch.Generator().manual_seed(num_tokens)
    w13, w2 = _weights(expert_ids)
    x = torch.randn(num_tokens, D, generator=g)
    ids = torch.randint(0, 8, (num_tokens, 2), generator=g)
    ids[::3, 1] = -1  # slots another shard serves
    weights = torch.rand(num_tokens, 2, generator=g)
    packed = run_experts(ExpertWeights.build(w13, w2, expert_ids), x, ids, weights)
    plain = run_experts(ExpertWeights(w13, w2, expert_ids), x, ids, weights)
    reference = _reference(w13, w2, expert_ids, x, ids, weights)
    torch.testing.assert_close(packed, plain, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(packed.double(), reference, atol=2e-5, rtol=1e-4)


def test_packed_weights_select_and_concatenate_like_experts(kernel):
    """Rebalancing adds and drops experts along dim 0 of either layout."""
    w13, w2 = _weights([0, 1, 2])
    full = ExpertWeights.build(w13, w2, [0, 1, 2])
    kept = full.with_experts(full.w13[[0, 2]], full.w2[[0, 2]], [0, 2])
    x = torch.randn(5, D)
    ids = torch.tensor([[0, 2]] * 5)
    weights = torch.full((5, 2), 0.5)
    torch.testing.assert_close(
        run_experts(kept, x, ids, weights), run_experts(full, x, ids, weights)
    )


def test_falls_back_where_it_does_not_apply(kernel, monkeypatch):
    assert not cpu_kernel.applies(torch.zeros(2, D, INTER))  # INTER is no panel multiple
    assert not cpu_kernel.applies(torch.zeros(2, D, 2 * INTER, dtype=torch.bfloat16))
    cpu_kernel.load.cache_clear()
    monkeypatch.setenv("MOESERVE_CPU_KERNEL", "0")
    try:
        assert cpu_kernel.load() is None
        w13, w2 = _weights([0, 1])
        assert not ExpertWeights.build(w13, w2, [0, 1]).packed
    finally:
        cpu_kernel.load.cache_clear()


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize(
    "heads,kv_heads,dim,block", [(8, 2, 16, 4), (4, 4, 64, 16), (6, 2, 32, 20)]
)
def test_paged_decode_matches_sdpa(kernel, monkeypatch, window, heads, kv_heads, dim, block):
    """Ragged contexts (1 token, block-aligned, long) through shuffled block tables; few
    sequences (a task per KV head) and many (a task per sequence)."""
    g = torch.Generator().manual_seed(heads + (window or 0))
    num_blocks = 80
    k_cache = torch.randn(num_blocks, block, kv_heads, dim, generator=g)
    v_cache = torch.randn(num_blocks, block, kv_heads, dim, generator=g)
    lens = torch.tensor([1, 2 * block, 5 * block + 3, 3 * block + 1] * 3)
    width = int((lens.max() + block - 1) // block)
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(len(lens), width, dtype=torch.int64)
    for i, n in enumerate(lens.tolist()):
        used = (n + block - 1) // block
        tables[i, :used] = perm[i * width : i * width + used]
    # the new token of each sequence is its last position: its K/V slot is written first
    slots = torch.tensor(
        [int(tables[i, (n - 1) // block]) * block + (n - 1) % block for i, n in enumerate(lens)]
    )
    q = torch.randn(len(lens), heads, dim, generator=g) * 3  # peaked softmax: large exponents
    k_new = torch.randn(len(lens), kv_heads, dim, generator=g)
    v_new = torch.randn(len(lens), kv_heads, dim, generator=g)

    def attend() -> torch.Tensor:
        groups = [DecodeGroup(0, tables[:3], lens[:3]), DecodeGroup(3, tables[3:], lens[3:])]
        meta = AttentionMetadata(slots, groups, [], GatherWorkspace())
        cache = (k_cache.clone(), v_cache.clone())
        return paged_attention(q, k_new, v_new, cache, meta, dim**-0.5, window)

    assert kernel.paged_decode_applies(q, k_cache, v_cache)
    with_kernel = attend()
    monkeypatch.setattr(cpu_kernel, "load", lambda: None)
    torch.testing.assert_close(with_kernel, attend(), atol=1e-5, rtol=1e-5)
