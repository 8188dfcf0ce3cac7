"""Paged attention: K/V live in a block pool and are read through per-request block tables.

Shapes: T scheduled tokens (flattened batch), H query heads, Hkv KV heads (GQA), D head_dim,
N blocks, B block size, S context length (cached + new tokens) of a sequence.
The KV cache of one layer is a pair of tensors [N, B, Hkv, D]; a token at position p of a
request lives in slot block_table[p // B] * B + p % B of the flattened [N * B, Hkv, D] view.

The cache may hold a narrower dtype than the compute (bfloat16 under float32 compute: the CPU's
`engine.dtype: bfloat16`, serve_app/model/quant/precision.py): rows are rounded to it (nearest
even) when written and widened back to the compute dtype when read, so attention itself always
accumulates in the compute dtype.

On the CPU in float32 (over a float32 or bfloat16 cache), the C kernels of
serve_app/kernels/cpu.py read K/V in place through the block tables: one call for all decoding
sequences and one for all prefill chunks of a step (no gather of the cached context, no masks).
Otherwise (GPU, other dtypes, no C compiler) this is plain torch: decoding sequences are batched
into one SDPA call per group over padded contexts, prefill chunks run one sequence at a time with
SDPA, and context K/V are copied out of the pool whole blocks at a time into a reused workspace:
per-slot gathers and fresh buffers each layer cost more than the attention itself (see
docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from serve_app.kernels import cpu as cpu_kernels


class GatherWorkspace:
    """Two reusable [rows, B * Hkv * D] buffers that context blocks are gathered into.

    Layers run one after another, so one pair serves every layer of a step.
    """

    def __init__(self) -> None:
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def gather(
        self, k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the given blocks, as [len(block_ids) * B, Hkv, D] views of the workspace.
        One cache passed as both (MLA's latent rows are keys and values) is gathered once."""
        n, b, hkv, d = k_cache.shape
        rows = block_ids.numel()
        if self._k is None or self._k.shape[0] < rows or self._k.dtype != k_cache.dtype:
            size = max(rows, 2 * (self._k.shape[0] if self._k is not None else 0))
            self._k = k_cache.new_empty(size, b * hkv * d)
            self._v = v_cache.new_empty(size, b * hkv * d)
        k_out = self._k[:rows]
        torch.index_select(k_cache.view(n, -1), 0, block_ids, out=k_out)
        if v_cache is k_cache:
            return (k_out.view(rows * b, hkv, d),) * 2
        v_out = self._v[:rows]
        torch.index_select(v_cache.view(n, -1), 0, block_ids, out=v_out)
        return k_out.view(rows * b, hkv, d), v_out.view(rows * b, hkv, d)


@dataclass(slots=True)
class DecodeGroup:
    """Decoding sequences of similar context length, attended in one padded SDPA call."""

    token_start: int
    blocks: torch.Tensor  # [n, max_blocks] block tables, padded with block 0
    ctx_lens: torch.Tensor  # [n]


@dataclass(slots=True)
class PrefillSeq:
    """A sequence computing q_len > 1 tokens (a prompt chunk, or a recompute)."""

    token_start: int  # offset in the flattened batch
    q_len: int
    ctx_len: int  # tokens of context after this chunk (cached + new)
    ctx_blocks: torch.Tensor  # block ids of the whole context (cached + this chunk)

    @property
    def has_cached(self) -> bool:
        return self.ctx_len > self.q_len


@dataclass(slots=True)
class AttentionMetadata:
    """Built once per step by the model runner, shared by every layer.

    NOTE: decode tokens come first in the flattened batch, group after group.
    """

    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    decode_groups: list[DecodeGroup]
    prefills: list[PrefillSeq]
    workspace: GatherWorkspace
    _masks: dict = field(default_factory=dict)

    def decodes_only(self) -> AttentionMetadata:
        """This step's decodes alone (MLA attends to its prefill chunks itself), built once."""
        if "decodes_only" not in self._masks:
            self._masks["decodes_only"] = AttentionMetadata(
                self.slot_mapping, self.decode_groups, [], self.workspace
            )
        return self._masks["decodes_only"]

    def decode_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All decode groups as one ([n, max_blocks] tables, [n] context lengths), for the
        kernel that reads ragged contexts (one parallel region per layer, not one per group)."""
        if "decode_batch" not in self._masks:
            width = max(g.blocks.shape[1] for g in self.decode_groups)
            tables = [F.pad(g.blocks, (0, width - g.blocks.shape[1])) for g in self.decode_groups]
            self._masks["decode_batch"] = (
                torch.cat(tables).to(torch.int64),
                torch.cat([g.ctx_lens for g in self.decode_groups]).to(torch.int64),
            )
        return self._masks["decode_batch"]

    def shared_prefixes(self, block_size: int) -> cpu_kernels.SharedPrefixes | None:
        """Groups of decoding sequences whose tables begin with the same blocks (cascade
        attention's shared part), built once per step; None when no group is worth it."""
        if "shared_prefixes" not in self._masks:
            tables, lens = self.decode_batch()
            groups = find_shared_prefixes(tables.tolist(), lens.tolist(), block_size)
            self._masks["shared_prefixes"] = cpu_kernels.SharedPrefixes(groups) if groups else None
        return self._masks["shared_prefixes"]

    def prefill_batch(self) -> cpu_kernels.PrefillBatch:
        """The prefill chunks as the prefill kernel reads them, built once per step."""
        if "prefill_batch" not in self._masks:
            seqs = self.prefills
            self._masks["prefill_batch"] = cpu_kernels.PrefillBatch(
                [s.ctx_blocks for s in seqs],
                [s.token_start for s in seqs],
                [s.q_len for s in seqs],
                [s.ctx_len for s in seqs],
            )
        return self._masks["prefill_batch"]

    def decode_mask(self, g: int, window: int | None, block_size: int) -> torch.Tensor:
        """[n, 1, 1, max_blocks * B] bool: inside the context and, if set, the window."""
        key = ("decode", g, window)
        if key not in self._masks:
            group = self.decode_groups[g]
            span = group.blocks.shape[1] * block_size
            j = torch.arange(span, device=group.blocks.device)
            lens = group.ctx_lens[:, None]
            mask = j[None, :] < lens
            if window is not None:
                mask &= j[None, :] > lens - 1 - window
            self._masks[key] = mask[:, None, None, :]
        return self._masks[key]

    def prefill_mask(self, i: int, window: int | None, span: int) -> torch.Tensor | None:
        """[q_len, span] bool causal (+ window) mask; None when plain is_causal suffices.

        span >= ctx_len: keys past the context (block padding) fall outside the causal mask.
        """
        seq = self.prefills[i]
        if window is None and seq.ctx_len == seq.q_len:
            return None
        key = (i, window)
        if key not in self._masks:
            device = self.slot_mapping.device
            pos = torch.arange(seq.ctx_len - seq.q_len, seq.ctx_len, device=device)[:, None]
            j = torch.arange(span, device=device)[None, :]
            mask = j <= pos
            if window is not None:
                mask &= j > pos - window
            self._masks[key] = mask
        return self._masks[key]


# Below this many shared blocks a group attends per sequence: the shared pass costs a parallel
# region and a merge, which a short prefix does not pay back.
MIN_SHARED_BLOCKS = 4


def find_shared_prefixes(
    tables: list[list[int]], lens: list[int], block_size: int, min_blocks: int = MIN_SHARED_BLOCKS
) -> list[tuple[list[int], list[int], int]]:
    """(decode rows, shared block ids, shared keys) for each group of >= 2 decoding sequences
    whose block tables begin with the same >= min_blocks blocks (prefix caching hands
    sequences with a common prompt prefix the very same blocks).

    Sequences are grouped by their first block; a group shares the longest common run of its
    members' tables, cut so that every member keeps at least its newest token for its own
    pass. Pure: the model runner's tables in, no tensors."""
    by_first: dict[int, list[int]] = {}
    for i, (t, n) in enumerate(zip(tables, lens, strict=True)):
        if n > block_size * min_blocks:
            by_first.setdefault(t[0], []).append(i)
    groups = []
    for rows in by_first.values():
        if len(rows) < 2:
            continue
        first = tables[rows[0]]
        shared = min((lens[i] - 1) // block_size for i in rows)
        for i in rows[1:]:
            t = tables[i]
            k = 0
            while k < shared and t[k] == first[k]:
                k += 1
            shared = k
        if shared >= min_blocks:
            groups.append((rows, first[:shared], shared * block_size))
    return groups


def write_rows(x: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> None:
    """Scatter the new tokens' rows x [T, heads, dim] into their slots of a [N, B, heads, dim]
    cache tensor (K, V, or MLA's latent), converted to the cache's dtype (float32 -> bfloat16
    rounds to nearest even: torch's conversion, the bit layout the C kernels widen back)."""
    n, b, heads, d = cache.shape
    cache.view(n * b, heads, d).index_copy_(0, slots, x.to(cache.dtype))


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots
) -> None:
    """Scatter the new tokens' K/V [T, Hkv, D] into their slots."""
    write_rows(k, k_cache, slots)
    write_rows(v, v_cache, slots)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: tuple[torch.Tensor, torch.Tensor],
    meta: AttentionMetadata,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """q [T, H, D], new k/v [T, Hkv, D] -> [T, H, D]. Writes k/v to the cache first, so any
    sequence in the batch may read blocks another one fills in this very step."""
    k_cache, v_cache = kv_cache
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    return attend(q, k, v, kv_cache, meta, scale, window)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: tuple[torch.Tensor, torch.Tensor],
    meta: AttentionMetadata,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """Attention of q [T, H, D] over caches the new tokens' k/v [T, Hkv, D] are already in.
    MLA passes its latent rows as both keys and values (one tensor), and slices the output."""
    k_cache, v_cache = kv_cache
    out = torch.empty_like(q)
    kernels = cpu_kernels.load() if q.device.type == "cpu" else None
    if kernels is not None and not kernels.paged_decode_applies(q, k_cache, v_cache):
        kernels = None
    if kernels is not None:
        _kernel_attention(kernels, q.contiguous(), kv_cache, meta, scale, window, out)
        return out
    _torch_decode(q, kv_cache, meta, scale, window, out)
    _torch_prefill(q, k, v, kv_cache, meta, scale, window, out)
    return out


def _kernel_attention(kernels, q, kv_cache, meta, scale, window, out) -> None:
    """Every decode in one kernel call and every prefill chunk in another."""
    k_cache, v_cache = kv_cache
    if meta.decode_groups:
        tables, lens = meta.decode_batch()
        starts = (lens - window).clamp(min=0) if window is not None else torch.zeros_like(lens)
        shared = meta.shared_prefixes(k_cache.shape[1]) if window is None else None
        out[: len(lens)] = kernels.paged_decode(
            q[: len(lens)], k_cache, v_cache, tables, lens, starts, scale, shared
        )
    if meta.prefills:
        kernels.paged_prefill(q, k_cache, v_cache, meta.prefill_batch(), scale, window, out)


def _torch_decode(q, kv_cache, meta, scale, window, out) -> None:
    k_cache, v_cache = kv_cache
    b = k_cache.shape[1]
    for g, group in enumerate(meta.decode_groups):
        s, e = group.token_start, group.token_start + group.blocks.shape[0]
        nd, span = group.blocks.shape[0], group.blocks.shape[1] * b
        kd, vd = _widened(meta.workspace.gather(k_cache, v_cache, group.blocks.reshape(-1)), q)
        kd = kd.view(nd, span, *kd.shape[1:]).transpose(1, 2)  # [n, Hkv, span, D]
        vd = vd.view(nd, span, *vd.shape[1:]).transpose(1, 2)
        o = F.scaled_dot_product_attention(
            q[s:e].unsqueeze(2),  # [n, H, 1, D]
            kd,
            vd,
            attn_mask=meta.decode_mask(g, window, b),
            scale=scale,
            enable_gqa=True,
        )
        out[s:e] = o.squeeze(2)


def _torch_prefill(q, k, v, kv_cache, meta, scale, window, out) -> None:
    k_cache, v_cache = kv_cache
    for i, seq in enumerate(meta.prefills):
        s, e = seq.token_start, seq.token_start + seq.q_len
        if not seq.has_cached:  # nothing cached before this chunk: the fresh K/V, as cached
            kp, vp = _widened((k[s:e].to(k_cache.dtype), v[s:e].to(v_cache.dtype)), q)
        else:
            kp, vp = _widened(meta.workspace.gather(k_cache, v_cache, seq.ctx_blocks), q)
        mask = meta.prefill_mask(i, window, kp.shape[0])
        o = F.scaled_dot_product_attention(
            q[s:e].transpose(0, 1),
            kp.transpose(0, 1),
            vp.transpose(0, 1),
            attn_mask=mask,
            is_causal=mask is None,
            scale=scale,
            enable_gqa=True,
        )
        out[s:e] = o.transpose(0, 1)


def _widened(kv: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor):
    """K/V as read from the cache, in q's dtype (a no-op when the cache holds it already)."""
    return tuple(t if t.dtype == q.dtype else t.to(q.dtype) for t in kv)
