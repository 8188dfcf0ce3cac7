"""Paged attention over a bfloat16 KV cache (engine.dtype bfloat16 on the CPU): rows written
are rounded to nearest even, and the C kernels (csrc/kv_elem.h: widened as loaded, at both
vector widths) and the torch fallback give what SDPA / a float64 reference give on the widened
values (float32 accumulation: the float32 kernels' own 1e-5)."""

from __future__ import annotations

import pytest
import torch

from serve_app.kernels import cpu as cpu_kernel
from serve_app.model.layers.attention import (
    AttentionMetadata,
    DecodeGroup,
    GatherWorkspace,
    PrefillSeq,
    paged_attention,
    write_rows,
)
from tests.kernels.conftest import WIDTHS, built

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module", params=WIDTHS)
def kernel(request):
    with built(request.param, cpu_kernel.load) as k:
        yield k


def _bf16_bits_rne(x: torch.Tensor) -> torch.Tensor:
    """The top 16 bits of float32 x after round-to-nearest-even, by integer arithmetic."""
    u = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).to(torch.int32)


def test_written_rows_are_rounded_to_nearest_even():
    """write_rows converts float32 rows into a bf16 cache with the documented bit layout:
    ties go to the even neighbour (1 + 2^-8 is halfway: rounds down; 1 + 3 * 2^-8 up)."""
    g = torch.Generator().manual_seed(0)
    ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 2**-130])
    x = torch.cat([torch.randn(60, generator=g) * 10, ties]).view(2, 4, 8)
    cache = torch.zeros(1, 4, 4, 8, dtype=torch.bfloat16)
    write_rows(x, cache, torch.tensor([1, 3]))
    got = cache.view(4, 4, 8)[[1, 3]].view(torch.int16).to(torch.int32) & 0xFFFF
    torch.testing.assert_close(got, _bf16_bits_rne(x), atol=0, rtol=0)
    assert cache.view(4, 4, 8)[[1, 3]].float().flatten()[-4:-1].tolist() == [1.0, 1 + 2**-6, -1.0]


def _tables(lens: list[int], block: int, num_blocks: int, g) -> torch.Tensor:
    width = -(-max(lens) // block)
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(len(lens), width, dtype=torch.int64)
    for i, n in enumerate(lens):
        used = -(-n // block)
        tables[i, :used] = perm[i * width : i * width + used]
    return tables


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize(
    "heads,kv_heads,dim,block",
    [(8, 2, 16, 4), (6, 2, 32, 20), (16, 1, 576, 16)],  # 576: MLA's latent rows (multi-query)
)
def test_decode_over_bf16_cache_matches_sdpa_on_widened_values(
    kernel, monkeypatch, window, heads, kv_heads, dim, block
):
    """Ragged contexts through shuffled tables, the new token's K/V written first: the kernel
    over the bf16 cache equals SDPA over a float32 cache holding the same (widened) values,
    and the torch fallback over the bf16 cache equals it too."""
    g = torch.Generator().manual_seed(heads + dim)
    num_blocks = 80
    k_cache = torch.randn(num_blocks, block, kv_heads, dim, generator=g).bfloat16()
    v_cache = torch.randn(num_blocks, block, kv_heads, dim, generator=g).bfloat16()
    lens = [1, 2 * block, 5 * block + 3, 3 * block + 1] * 2
    tables = _tables(lens, block, num_blocks, g)
    slots = torch.tensor([int(tables[i, (n - 1) // block]) * block + (n - 1) % block
                          for i, n in enumerate(lens)])  # fmt: skip
    q = torch.randn(len(lens), heads, dim, generator=g) * 3
    k_new = torch.randn(len(lens), kv_heads, dim, generator=g)
    v_new = torch.randn(len(lens), kv_heads, dim, generator=g)

    def attend(cache_dtype: torch.dtype) -> torch.Tensor:
        groups = [DecodeGroup(0, tables[:3], torch.tensor(lens[:3])),
                  DecodeGroup(3, tables[3:], torch.tensor(lens[3:]))]  # fmt: skip
        meta = AttentionMetadata(slots, groups, [], GatherWorkspace())
        cache = (k_cache.to(cache_dtype), v_cache.to(cache_dtype))
        # a float32 cache gets the new rows as bf16 would hold them
        kn, vn = (k_new, v_new) if cache_dtype == torch.bfloat16 else (
            k_new.bfloat16().float(), v_new.bfloat16().float())  # fmt: skip
        return paged_attention(q, kn, vn, cache, meta, dim**-0.5, window)

    assert kernel.paged_decode_applies(q, k_cache, v_cache)
    with_kernel = attend(torch.bfloat16)
    monkeypatch.setattr(cpu_kernel, "load", lambda: None)
    sdpa_widened = attend(torch.float32)
    torch.testing.assert_close(with_kernel, sdpa_widened, **TOL)
    torch.testing.assert_close(attend(torch.bfloat16), sdpa_widened, **TOL)  # torch fallback


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize(
    "heads,kv_heads,dim,block", [(8, 4, 64, 16), (6, 2, 32, 5), (16, 1, 576, 16)]
)
def test_prefill_over_bf16_cache_matches_float64_on_widened_values(
    kernel, monkeypatch, window, heads, kv_heads, dim, block
):
    """Chunks after cached prefixes, a whole prompt and a 2-token chunk beside a decode: the
    kernel and the torch fallback, both over the bf16 cache, against float64 attention over
    the widened cache contents."""
    g = torch.Generator().manual_seed(heads * dim + (window or 0))
    num_blocks = 64
    k_cache = torch.randn(num_blocks, block, kv_heads, dim, generator=g).bfloat16()
    v_cache = torch.randn(num_blocks, block, kv_heads, dim, generator=g).bfloat16()
    perm = torch.randperm(num_blocks, generator=g).tolist()
    shapes = [(3 * block, 1), (4 * block, 19), (0, 23), (2 * block + 3, 2)]  # (cached, new)
    tables, ctx_lens, slots = [], [], []
    for cached, new in shapes:
        table = [perm.pop() for _ in range(-(-(cached + new) // block))]
        tables.append(torch.tensor(table))
        ctx_lens.append(cached + new)
        slots += [table[p // block] * block + p % block for p in range(cached, cached + new)]
    total = sum(new for _, new in shapes)
    q = torch.randn(total, heads, dim, generator=g) * 2
    k_new = torch.randn(total, kv_heads, dim, generator=g)
    v_new = torch.randn(total, kv_heads, dim, generator=g)
    prefills, start = [], 1
    for (_c, new), table, ctx in zip(shapes[1:], tables[1:], ctx_lens[1:], strict=True):
        prefills.append(PrefillSeq(start, new, ctx, table))
        start += new
    scale = dim**-0.5

    def attend():
        groups = [DecodeGroup(0, tables[0][None], torch.tensor(ctx_lens[:1]))]
        meta = AttentionMetadata(torch.tensor(slots), groups, prefills, GatherWorkspace())
        cache = (k_cache.clone(), v_cache.clone())
        return paged_attention(q, k_new, v_new, cache, meta, scale, window), cache

    with_kernel, (k_full, v_full) = attend()
    assert k_full.dtype == torch.bfloat16
    monkeypatch.setattr(cpu_kernel, "load", lambda: None)
    plain, _ = attend()
    torch.testing.assert_close(with_kernel, plain, **TOL)
    row = 0
    for (_c, new), table, ctx in zip(shapes, tables, ctx_lens, strict=True):
        kk = k_full[table].reshape(-1, kv_heads, dim)[:ctx].double()
        vv = v_full[table].reshape(-1, kv_heads, dim)[:ctx].double()
        for j in range(new):
            pos = ctx - new + j
            lo = max(0, pos - window + 1) if window else 0
            for h in range(heads):
                hk = h * kv_heads // heads
                p = torch.softmax(kk[lo : pos + 1, hk] @ q[row + j, h].double() * scale, 0)
                want = p @ vv[lo : pos + 1, hk]
                torch.testing.assert_close(with_kernel[row + j, h].double(), want, **TOL)
        row += new


@pytest.mark.parametrize("heads,kv_heads,dim,block", [(8, 4, 64, 16), (16, 1, 576, 16)])
def test_cascade_decode_over_bf16_cache_matches_per_sequence(kernel, heads, kv_heads, dim, block):
    """Sequences sharing their first blocks (moeserve_shared_prefix_bf16, then the decode
    kernel continuing from it) give what the per-sequence kernel and float64 give."""
    g = torch.Generator().manual_seed(heads * block)
    num_blocks = 40
    k_cache = torch.randn(num_blocks, block, kv_heads, dim, generator=g).bfloat16()
    v_cache = torch.randn(num_blocks, block, kv_heads, dim, generator=g).bfloat16()
    perm = torch.randperm(num_blocks, generator=g).tolist()
    prefix, own = perm[:5], iter(perm[5:])
    lens = [5 * block + 1, 6 * block + 9, 7 * block]
    tables = [prefix + [next(own) for _ in range(-(-n // block) - 5)] for n in lens]
    groups = [([0, 1, 2], prefix, 5 * block)]
    width = max(len(t) for t in tables)
    table_t = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    lens_t = torch.tensor(lens)
    q = torch.randn(len(lens), heads, dim, generator=g) * 3
    starts = torch.zeros(len(lens), dtype=torch.int64)
    shared = cpu_kernel.SharedPrefixes(groups)
    cascade = kernel.paged_decode(q, k_cache, v_cache, table_t, lens_t, starts, dim**-0.5, shared)
    plain = kernel.paged_decode(q, k_cache, v_cache, table_t, lens_t, starts, dim**-0.5)
    torch.testing.assert_close(cascade, plain, **TOL)
    for i, n in enumerate(lens):
        slots = torch.tensor([tables[i][p // block] * block + p % block for p in range(n)])
        kk = k_cache.view(-1, kv_heads, dim)[slots].double()
        vv = v_cache.view(-1, kv_heads, dim)[slots].double()
        for h in range(heads):
            hk = h * kv_heads // heads
            p = torch.softmax(kk[:, hk] @ q[i, h].double() * dim**-0.5, 0)
            torch.testing.assert_close(cascade[i, h].double(), p @ vv[:, hk], **TOL)


def test_mixed_dtypes_are_not_handed_to_the_kernels(kernel):
    """Only float32 queries over a float32 or bfloat16 cache (K and V alike) take the kernels."""
    q = torch.randn(2, 4, 16)
    bf = torch.zeros(4, 4, 2, 16, dtype=torch.bfloat16)
    assert kernel.paged_decode_applies(q, bf, bf)
    assert not kernel.paged_decode_applies(q, bf, bf.float())
    assert not kernel.paged_decode_applies(q, bf.half(), bf.half())
    assert not kernel.paged_decode_applies(q.bfloat16(), bf, bf)
