"""DeepSeek's multi-head latent attention (MLA) over a paged latent KV cache.

Per token the cache keeps one row: the normalised compressed kv c (kv_lora_rank) followed by
the roped shared key k_pe (qk_rope_head_dim): latent_dim floats per layer, where expanded K/V
would take 2 x heads x head_dim. Attention runs in absorbed form (DeepSeek-V2 paper, vLLM's
`mla_attention.py`, SGLang's MLATokenToKVPool): W_UK (the k_nope rows of kv_b_proj) is folded
into the query and W_UV applied after attention, so every head attends over the same latent
rows, multi-query attention with head dim latent_dim, and the paged kernels of attention.py read
the cache in place (keys and values are the same rows; values are their first kv_lora_rank).

Checkpoints whose rope dims come in interleaved (x0, x1) pairs (DeepSeek-V2, V3 with
rope_interleave) get the q and k_pe rows of their projections permuted once at load into the
rotate_half layout, which gives the same scores with the one rope kernel; the cached k_pe is
then in that layout (serve_app/model/kv_format.py ROPE_LAYOUT). The latent cache may be
bfloat16 under float32 compute (attention.py): every path reads the latents as cached.

A prefill chunk with nothing cached before it attends in expanded form instead (as vLLM and
SGLang do): kv_b_proj expands its own latents to per-head K (nope + rope) and V, and causal
SDPA runs over qk head dim N + P and value dim V, far fewer FLOPs than latent_dim-wide absorbed
attention once the chunk is long (docs/benchmarks.md, "DeepSeek"). Decodes and chunks after a
cached prefix (local, or loaded from Redis) read the latent cache in absorbed form.
Shapes: T tokens, H heads, R kv_lora_rank, P qk_rope_head_dim, N qk_nope_head_dim,
V v_head_dim, L = R + P latent row, M hidden size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from serve_app.lora import batch as lora
from serve_app.model.config import ModelSpec
from serve_app.model.layers.attention import AttentionMetadata, attend, write_rows
from serve_app.model.layers.linear import project
from serve_app.model.layers.norm import RMSNorm
from serve_app.model.layers.rotary import apply_rotary

# query rows (tokens x heads) per score matrix of an absorbed prefill chunk: bounds its memory
_ROWS_PER_SLICE = 2048
# transformers builds q_a_layernorm and kv_a_layernorm with the RMSNorm default, not the config's
_LORA_NORM_EPS = 1e-6


class MLAttention(nn.Module):
    # fresh prefill chunks in expanded form (False: everything absorbed; for measurements)
    expand_fresh_prefills = True

    def __init__(self, spec: ModelSpec, layer_idx: int):
        super().__init__()
        m = spec.mla
        assert m is not None
        self.mla = m
        hidden, h = spec.hidden_size, spec.num_heads
        bias = bool(getattr(spec.hf_config, "attention_bias", False))
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        self.num_heads = h
        if m.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, h * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, m.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, _LORA_NORM_EPS)
            self.q_b_proj = nn.Linear(m.q_lora_rank, h * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, m.latent_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, _LORA_NORM_EPS)
        self.kv_b_proj = nn.Linear(
            m.kv_lora_rank, h * (m.qk_nope_head_dim + m.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(h * m.v_head_dim, hidden, bias=bias)
        # absorbed weights, split from kv_b_proj by after_load(): [H, N, R] and [H, R, V]
        self.w_uk: torch.Tensor | None = None
        self.w_uv: torch.Tensor | None = None

    @torch.no_grad()
    def after_load(self) -> None:
        """Permute interleaved rope rows into rotate_half order and split W_UK / W_UV once."""
        m, h = self.mla, self.num_heads
        if m.rope_interleave:
            p = m.qk_rope_head_dim
            perm = torch.cat([torch.arange(0, p, 2), torch.arange(1, p, 2)])
            q = self.q_proj if m.q_lora_rank is None else self.q_b_proj
            w = q.weight.view(h, m.qk_nope_head_dim + p, -1)
            w[:, m.qk_nope_head_dim :] = w[:, m.qk_nope_head_dim :][:, perm.to(w.device)]
            kv = self.kv_a_proj_with_mqa
            tail = perm.to(kv.weight.device) + m.kv_lora_rank
            kv.weight[m.kv_lora_rank :] = kv.weight[tail]
            if kv.bias is not None:
                kv.bias[m.kv_lora_rank :] = kv.bias[tail]
        w = self.kv_b_proj.weight.view(h, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)
        self.w_uk = w[:, : m.qk_nope_head_dim].contiguous()  # q_nope @ w_uk: latent query
        self.w_uv = w[:, m.qk_nope_head_dim :].transpose(1, 2).contiguous()

    def lora_row_orders(self) -> dict[str, torch.Tensor]:
        """The row order after_load() gave the permuted weights (new row i = checkpoint row
        order[i]), so that a LoRA B matrix can be permuted alike."""
        m, h = self.mla, self.num_heads
        if not m.rope_interleave:
            return {}
        p, nope = m.qk_rope_head_dim, m.qk_nope_head_dim
        perm = torch.cat([torch.arange(0, p, 2), torch.arange(1, p, 2)])
        head = torch.cat([torch.arange(nope), nope + perm])
        q_rows = (torch.arange(h)[:, None] * (nope + p) + head).reshape(-1)
        kv_rows = torch.cat([torch.arange(m.kv_lora_rank), m.kv_lora_rank + perm])
        q_name = "q_proj" if m.q_lora_rank is None else "q_b_proj"
        return {q_name: q_rows, "kv_a_proj_with_mqa": kv_rows}

    def forward(
        self, x: torch.Tensor, cos_sin: tuple, kv_cache: tuple, meta: AttentionMetadata
    ) -> torch.Tensor:
        m, t, h = self.mla, x.shape[0], self.num_heads
        if m.q_lora_rank is None:
            q, ckv = project(x, self.q_proj, self.kv_a_proj_with_mqa)
        else:
            qa, ckv = project(x, self.q_a_proj, self.kv_a_proj_with_mqa)
            q = project(self.q_a_layernorm(qa.contiguous()), self.q_b_proj)[0]
        q = q.view(t, h, m.qk_nope_head_dim + m.qk_rope_head_dim)
        q_nope, q_pe = q.split([m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
        c, k_pe = ckv.split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        latent = torch.cat(
            [self.kv_a_layernorm(c.contiguous()), apply_rotary(k_pe[:, None, :], *cos_sin)[:, 0]],
            dim=-1,
        ).view(t, 1, m.latent_dim)
        q_pe = apply_rotary(q_pe, *cos_sin)
        cache = kv_cache[0]
        write_rows(latent, cache, meta.slot_mapping)
        fresh, cached = [], []
        for p in meta.prefills:
            (cached if p.has_cached or not self.expand_fresh_prefills else fresh).append(p)
        if meta.decode_groups or cached:
            kv_b_lora = self._kv_b_lora(q_nope.dtype)
            # [H, T, N] @ [H, N, R] -> the query against the latent, then its rope part
            q_lat = torch.bmm(q_nope.transpose(0, 1), self.w_uk).transpose(0, 1)
            for a, b_k, _, rows in kv_b_lora:  # W_UK + B_k A per head
                q_lat[rows] += torch.einsum("thn,hnr->thr", q_nope[rows], b_k) @ a
            q_abs = torch.cat([q_lat, q_pe], dim=-1)
            o = q_abs.new_empty(q_abs.shape)
            if meta.decode_groups:
                decodes = meta.decodes_only()
                o = attend(q_abs, latent, latent, (cache, cache), decodes, m.softmax_scale, None)
            for seq in cached:
                s, e = seq.token_start, seq.token_start + seq.q_len
                o[s:e] = self._absorbed_chunk(q_abs[s:e], cache, seq, meta)
            # values are the latent's first R dims; W_UV per head: [H, T, R] @ [H, R, V]
            out = torch.bmm(o[..., : m.kv_lora_rank].transpose(0, 1), self.w_uv).transpose(0, 1)
            for a, _, b_v, rows in kv_b_lora:  # W_UV + (B_v A).T per head
                out[rows] += torch.einsum("thr,hvr->thv", o[rows, :, : m.kv_lora_rank] @ a.T, b_v)
        else:
            out = x.new_empty(t, h, m.v_head_dim)
        if fresh and cache.dtype != latent.dtype:  # the latents as cached (bf16-rounded)
            latent = latent.to(cache.dtype).to(latent.dtype)
        for seq in fresh:
            s, e = seq.token_start, seq.token_start + seq.q_len
            out[s:e] = self._expanded(q_nope[s:e], q_pe[s:e], latent[s:e, 0], slice(s, e))
        return project(out.reshape(t, h * m.v_head_dim), self.o_proj)[0]

    def _absorbed_chunk(self, q, cache, seq, meta: AttentionMetadata) -> torch.Tensor:
        """A prefill chunk over its cached context in absorbed form: q [n, H, L] -> [n, H, L].

        Every head reads the same latent rows (multi-query), so the chunk's n x H query rows
        are one matrix against the context's rows: two GEMMs per slice of rows (the context is
        gathered once, whole blocks), far faster here than the paged kernel at L = 576
        (docs/benchmarks.md, "DeepSeek"). Causal: the query at position p sees keys [0, p]."""
        n, h, width = q.shape
        keys = meta.workspace.gather(cache, cache, seq.ctx_blocks)[0][: seq.ctx_len, 0]
        keys = keys.to(q.dtype)  # a bfloat16 cache widened
        first = seq.ctx_len - n
        pos = torch.arange(first, seq.ctx_len, device=q.device)
        rows = q.reshape(n * h, width)
        out = torch.empty_like(rows)
        step = max(h, _ROWS_PER_SLICE // h * h)
        for r0 in range(0, n * h, step):
            r1 = min(n * h, r0 + step)
            scores = (rows[r0:r1] @ keys.T) * self.mla.softmax_scale
            visible = (
                torch.arange(seq.ctx_len, device=q.device)[None] <= pos[r0 // h : r1 // h, None]
            )
            scores = scores.view(-1, h, seq.ctx_len).masked_fill_(~visible[:, None], float("-inf"))
            out[r0:r1] = torch.softmax(scores.view(r1 - r0, -1), dim=-1) @ keys
        return out.view(n, h, width)

    def _kv_b_lora(self, dtype: torch.dtype) -> list[tuple[torch.Tensor, ...]]:
        """kv_b_proj's LoRA in the absorbed form, per adapter of the batch that adapts it:
        (A [r, R], B_k [H, N, r], B_v [H, V, r], the rows it runs). Torch ops (no C kernel):
        W_UK's delta is B_k A, so q_nope @ B_k then @ A; W_UV's, o @ A.T then @ B_v.T."""
        batch = lora.current()
        if batch is None:
            return []
        m, h, out = self.mla, self.num_heads, []
        for w, rows in batch.linear_groups(getattr(self.kv_b_proj, "lora_name", None)):
            a, b = w.a.to(dtype), w.b.to(dtype).view(h, m.qk_nope_head_dim + m.v_head_dim, -1)
            out.append((a, b[:, : m.qk_nope_head_dim], b[:, m.qk_nope_head_dim :], rows))
        return out

    def _expanded(self, q_nope, q_pe, latent, rows: slice) -> torch.Tensor:
        """Causal attention of one chunk over its own tokens, K/V expanded from its latents:
        [n, H, N], [n, H, P], [n, L] -> [n, H, V]; `rows`: its tokens in the batch (the
        LoRA delta of kv_b_proj is that of their adapter)."""
        m, n, h = self.mla, latent.shape[0], self.num_heads
        kv = project(latent[:, : m.kv_lora_rank].contiguous(), self.kv_b_proj, rows=rows)[0]
        kv = kv.view(n, h, m.qk_nope_head_dim + m.v_head_dim)
        k_pe = latent[:, None, m.kv_lora_rank :].expand(n, h, m.qk_rope_head_dim)
        k = torch.cat([kv[..., : m.qk_nope_head_dim], k_pe], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1),
            k.transpose(0, 1),
            kv[..., m.qk_nope_head_dim :].transpose(0, 1),
            is_causal=True,
            scale=m.softmax_scale,
        )
        return o.transpose(0, 1)
