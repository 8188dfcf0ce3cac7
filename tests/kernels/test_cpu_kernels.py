"""The CPU kernels against plain torch and a float64 reference: the grouped expert matmul (any
routing, packed weights that select and concatenate like experts, dense projections), paged
decode and prefill attention (GQA, windows, ragged contexts, cached prefixes), each under more
than one blocking choice."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from serve_app.experts.local import ExpertWeights, run_experts
from serve_app.kernels import cpu as cpu_kernel
from serve_app.kernels.tuning import Blocking
from serve_app.model.layers.attention import (
    AttentionMetadata,
    DecodeGroup,
    GatherWorkspace,
    PrefillSeq,
    paged_attention,
)
from tests.kernels.conftest import WIDTHS, built

# blocking choices every kernel test runs under: this CPU's, and ones another CPU would pick
BLOCKINGS = [
    None,
    Blocking(mr=3, kc=0, qt=1, mkl_rows=0),
    Blocking(mr=12, kc=32, qt=5, mkl_rows=48),
    Blocking(mr=1, kc=16, qt=64, mkl_rows=0),
]

D, INTER = 64, 80  # 2 * INTER = 160 and D are panel multiples, INTER alone is not


def _weights(
    expert_ids: list[int], seed: int = 0, inter: int = INTER
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = len(expert_ids)
    return torch.randn(n, D, 2 * inter, generator=g) * 0.1, torch.randn(
        n, inter, D, generator=g
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


@pytest.fixture(scope="module", params=WIDTHS)
def kernel(request):
    """The kernels as built for this CPU, and for the other vector width."""
    with built(request.param, cpu_kernel.load) as k:
        yield k


def test_builds_and_packs_here(kernel):
    w13, w2 = _weights([0, 1, 2])
    w = ExpertWeights.build(w13, w2, [0, 1, 2])
    assert w.packed
    assert w.w13.shape == (3, 2 * INTER // cpu_kernel.PANEL, D, cpu_kernel.PANEL)
    assert w.intermediate_size == INTER


@pytest.fixture(params=BLOCKINGS, ids=lambda b: "native" if b is None else str(b))
def blocked(kernel, request, monkeypatch):
    """The kernels under one blocking choice (None: the one chosen for this CPU)."""
    if request.param is not None:
        monkeypatch.setattr(kernel, "blocking", request.param)
    return kernel


@pytest.mark.parametrize("num_tokens", [1, 7, 64, 300])  # 300: some go to MKL if mkl_rows=48
@pytest.mark.parametrize("expert_ids", [[0, 1, 2, 3, 4, 5], [5, 2, 7]])  # a shard, unsorted
@pytest.mark.parametrize("inter", [INTER, 64])  # 64: gate|up split at a panel: the fused kernel
def test_packed_matches_torch_and_reference(blocked, num_tokens, expert_ids, inter):
    g = torch.Generator().manual_seed(num_tokens)
    w13, w2 = _weights(expert_ids, inter=inter)
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
    "heads,kv_heads,dim,block",
    [(8, 2, 16, 4), (4, 4, 64, 16), (6, 2, 32, 20), (16, 1, 576, 16)],  # 576: MLA latent rows
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


@pytest.mark.parametrize("rows", [1, 5, 64, 200])
def test_linear_matches_matmul(blocked, rows):
    """A dense projection as one packed "expert" (decode and prefill row counts)."""
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(1, D, 96, generator=g) * 0.1
    x = torch.randn(rows, D, generator=g)
    got = blocked.linear(x, cpu_kernel.pack(w))
    torch.testing.assert_close(got, x @ w[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.double(), x.double() @ w[0].double(), atol=1e-5, rtol=1e-5)


def _prefill_reference(q, k_seq, v_seq, ctx_len, window, scale):
    """float64, one query at a time: q [q_len, H, D] over keys [0, ctx_len) of one sequence."""
    q_len, h, _ = q.shape
    group = h // k_seq.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for j in range(q_len):
        pos = ctx_len - q_len + j
        lo = max(0, pos - window + 1) if window else 0
        for head in range(h):
            kk = k_seq[lo : pos + 1, head // group].double()
            vv = v_seq[lo : pos + 1, head // group].double()
            p = torch.softmax(kk @ q[j, head].double() * scale, dim=0)
            out[j, head] = p @ vv
    return out


# 16 x 1, 16 x 3: few sequences, heads split across tasks; 3: too few heads for the lanes
# (paged_decode's per-head path); 24 x 5: whole sequences per task, 3 vectors of heads on
# AVX2; 128: more heads than a task's 64 rows (DeepSeek-V3's real count)
@pytest.mark.parametrize(("heads", "n"), [(16, 1), (16, 3), (3, 1), (24, 5), (128, 2)])
def test_multi_query_decode_splits_a_few_sequences_heads_across_tasks(kernel, heads, n):
    """One KV head (MLA's absorbed form): the result is each head's softmax over its keys,
    however a sequence's heads are cut into tasks."""
    g = torch.Generator().manual_seed(heads * 10 + n)
    block, dim, num_blocks = 16, 576, 24
    cache = torch.randn(num_blocks, block, 1, dim, generator=g)
    lens = torch.tensor([37, 16, 80, 96, 1][:n])
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:6] for _ in range(n)])
    q = torch.randn(n, heads, dim, generator=g)
    out = kernel.paged_decode(q, cache, cache, tables, lens, torch.zeros(n), dim**-0.5)
    for i in range(n):
        keys = cache[tables[i]].reshape(-1, dim)[: lens[i]].double()
        p = torch.softmax(q[i].double() @ keys.T * dim**-0.5, dim=-1)
        torch.testing.assert_close(out[i].double(), p @ keys, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize(
    "heads,kv_heads,dim,block", [(8, 4, 64, 16), (6, 2, 32, 5), (4, 4, 16, 8), (16, 1, 576, 16)]
)
def test_paged_prefill_matches_torch_and_reference(
    blocked, monkeypatch, window, heads, kv_heads, dim, block
):
    """Chunks after cached prefixes (block-aligned or not), a whole prompt, a 2-token chunk,
    beside two decodes, through shuffled block tables; against the SDPA path and float64."""
    g = torch.Generator().manual_seed(heads * dim + (window or 0))
    num_blocks = 96
    k_cache = torch.randn(num_blocks, block, kv_heads, dim, generator=g)
    v_cache = torch.randn(num_blocks, block, kv_heads, dim, generator=g)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    # (cached tokens, new tokens) per sequence; the first two decode
    shapes = [(9, 1), (3 * block, 1), (4 * block, 19), (0, 23), (2 * block + 3, 2), (7, 40)]
    tables, ctx_lens, slots = [], [], []
    for cached, new in shapes:
        n = -(-(cached + new) // block)
        table = [perm.pop() for _ in range(n)]
        tables.append(torch.tensor(table))
        ctx_lens.append(cached + new)
        slots += [table[p // block] * block + p % block for p in range(cached, cached + new)]
    total = sum(new for _, new in shapes)
    q = torch.randn(total, heads, dim, generator=g) * 2
    k_new = torch.randn(total, kv_heads, dim, generator=g)
    v_new = torch.randn(total, kv_heads, dim, generator=g)
    width = max(len(t) for t in tables[:2])
    decode_tables = torch.stack([F.pad(t, (0, width - len(t))) for t in tables[:2]])
    prefills, start = [], 2
    for (_cached, new), table, ctx in zip(shapes[2:], tables[2:], ctx_lens[2:], strict=True):
        prefills.append(PrefillSeq(start, new, ctx, table))
        start += new
    scale = dim**-0.5

    def attend() -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        groups = [DecodeGroup(0, decode_tables, torch.tensor(ctx_lens[:2]))]
        meta = AttentionMetadata(torch.tensor(slots), groups, prefills, GatherWorkspace())
        cache = (k_cache.clone(), v_cache.clone())
        return paged_attention(q, k_new, v_new, cache, meta, scale, window), cache

    with_kernel, (k_full, v_full) = attend()
    monkeypatch.setattr(cpu_kernel, "load", lambda: None)
    plain, _ = attend()
    torch.testing.assert_close(with_kernel, plain, atol=1e-5, rtol=1e-5)
    row = 0
    for (_cached, new), table, ctx in zip(shapes, tables, ctx_lens, strict=True):
        k_seq = k_full[table].reshape(-1, kv_heads, dim)[:ctx]
        v_seq = v_full[table].reshape(-1, kv_heads, dim)[:ctx]
        want = _prefill_reference(q[row : row + new], k_seq, v_seq, ctx, window, scale)
        torch.testing.assert_close(
            with_kernel[row : row + new].double(), want, atol=1e-5, rtol=1e-5
        )
        row += new


def _rms_reference(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return w.double() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("rows", [1, 64, 3000])  # 3000 x 64: a parallel call
def test_rms_norm_matches_reference(kernel, rows):
    """Plain rows, rows with the residual added in the same pass, and the per-head rows of a
    column slice of a fused projection (strided tokens)."""
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(64, generator=g)
    x = torch.randn(rows, 64, generator=g) * 3
    res = torch.randn(rows, 64, generator=g)
    summed, out = kernel.rms_norm(x, w, 1e-6)
    assert summed is None
    torch.testing.assert_close(out.double(), _rms_reference(x, w, 1e-6), atol=1e-5, rtol=1e-5)
    summed, out = kernel.rms_norm(x, w, 1e-6, res)
    torch.testing.assert_close(summed, x + res)
    torch.testing.assert_close(out.double(), _rms_reference(x + res, w, 1e-6), atol=1e-5, rtol=1e-5)
    fused = torch.randn(rows, 5 * 32, generator=g)
    heads = fused[:, 32:].view(rows, 2, 64)  # strided tokens, contiguous heads
    assert kernel.rms_norm_applies(heads, w)
    got = kernel.rms_norm(heads, w, 1e-6)[1]
    assert got.is_contiguous()
    torch.testing.assert_close(got.double(), _rms_reference(heads, w, 1e-6), atol=1e-5, rtol=1e-5)


def test_rms_norm_module_and_residual_match_torch(kernel, monkeypatch):
    """RMSNorm and add_rms_norm give torch's results with the kernel and without it."""
    from serve_app.model.layers.norm import RMSNorm, add_rms_norm

    g = torch.Generator().manual_seed(1)
    norm = RMSNorm(48 + 16, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=g))
    x, res = torch.randn(7, 64, generator=g), torch.randn(7, 64, generator=g)
    with torch.no_grad():
        fast = (norm(x), *add_rms_norm(x, res, norm))
        monkeypatch.setattr(cpu_kernel, "load", lambda: None)
        slow = (norm(x), *add_rms_norm(x, res, norm))
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "heads,kv_heads,dim,block", [(8, 4, 64, 16), (6, 2, 32, 5), (4, 4, 16, 8), (16, 1, 576, 16)]
)
def test_cascade_decode_matches_per_sequence(kernel, monkeypatch, heads, kv_heads, dim, block):
    """Decoding sequences that share their first blocks (two groups of different sizes, one
    member ending right after the shared part, one sequence on its own) give what the plain
    per-sequence kernel and torch give."""
    from serve_app.model.layers.attention import find_shared_prefixes

    g = torch.Generator().manual_seed(heads * block)
    num_blocks = 120
    k_cache = torch.randn(num_blocks, block, kv_heads, dim, generator=g)
    v_cache = torch.randn(num_blocks, block, kv_heads, dim, generator=g)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    prefix_a, prefix_b = perm[:6], perm[6:11]  # shared blocks of two groups
    own = iter(perm[11:])
    lens = [6 * block + 1, 6 * block + 9, 8 * block, 5 * block + 3, 7 * block + 2, 9 * block]
    heads_of = [prefix_a, prefix_a, prefix_a, prefix_b, prefix_b, [next(own)]]
    tables = []
    for n, head in zip(lens, heads_of, strict=True):
        need = (n + block - 1) // block
        tables.append(head[:need] + [next(own) for _ in range(need - len(head[:need]))])
    groups = find_shared_prefixes(tables, lens, block)
    assert sorted(len(rows) for rows, _, _ in groups) == [2, 3]
    width = max(len(t) for t in tables)
    table_t = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    lens_t = torch.tensor(lens)
    q = torch.randn(len(lens), heads, dim, generator=g) * 3
    starts = torch.zeros(len(lens), dtype=torch.int64)
    shared = cpu_kernel.SharedPrefixes(groups)
    cascade = kernel.paged_decode(q, k_cache, v_cache, table_t, lens_t, starts, dim**-0.5, shared)
    plain = kernel.paged_decode(q, k_cache, v_cache, table_t, lens_t, starts, dim**-0.5)
    torch.testing.assert_close(cascade, plain, atol=1e-5, rtol=1e-5)
    for i, n in enumerate(lens):  # float64 reference, sequence by sequence
        slots = torch.tensor([tables[i][p // block] * block + p % block for p in range(n)])
        kk = k_cache.view(-1, kv_heads, dim)[slots].double()
        vv = v_cache.view(-1, kv_heads, dim)[slots].double()
        for h in range(heads):
            p = torch.softmax(kk[:, h * kv_heads // heads] @ q[i, h].double() * dim**-0.5, 0)
            want = p @ vv[:, h * kv_heads // heads]
            torch.testing.assert_close(cascade[i, h].double(), want, atol=1e-5, rtol=1e-5)


def test_find_shared_prefixes_groups_by_common_blocks():
    """Groups need >= 2 members and >= min_blocks common full blocks; every member keeps its
    newest token out of the shared part; a short context or a different first block is alone."""
    from serve_app.model.layers.attention import find_shared_prefixes

    b = 4
    tables = [
        [1, 2, 3, 4, 5, 9],  # 24 tokens
        [1, 2, 3, 4, 5, 6, 7],  # 25 tokens
        [1, 2, 3, 8, 10],  # diverges after 3 blocks
        [20, 21, 22, 23, 24],
        [20, 21, 22, 23, 25],
        [30, 31],
    ]
    lens = [24, 25, 20, 20, 17, 8]
    groups = find_shared_prefixes(tables, lens, b, min_blocks=4)
    assert groups == [([3, 4], [20, 21, 22, 23], 16)]  # rows 0-2 share only 3 blocks
    groups = find_shared_prefixes(tables[:2], lens[:2], b, min_blocks=4)
    assert groups == [([0, 1], [1, 2, 3, 4, 5], 20)]  # (24 - 1) // 4 = 5 blocks for row 0
    assert find_shared_prefixes(tables[:2], [16, 25], b, min_blocks=4) == []  # 16 <= 4 blocks
