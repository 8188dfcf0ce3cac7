"""One decoder-only transformer that covers every supported architecture.

Llama, Qwen3, Qwen3-MoE, Qwen2-MoE, Mixtral and DeepSeek-V2/V3 differ only in traits (q/k norm,
q/k/v bias, MoE or dense MLP, shared expert, routing rule, sliding window, attention format),
which ModelSpec carries; the attention module (grouped-query `Attention` or latent `MLAttention`)
and the routing rule are chosen once at construction, the layer loop is the same. Module names
mirror the HF checkpoints so dense weights load by name; expert weights go to an ExpertExecutor.
Shapes: T tokens of the flattened batch, H / Hkv heads, D head_dim, M hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from serve_app.lora.batch import LoraBatch, active_batch
from serve_app.model.config import ModelSpec
from serve_app.model.expert_executor import DoneFuture, ExpertFuture
from serve_app.model.layers.attention import AttentionMetadata, paged_attention
from serve_app.model.layers.linear import project
from serve_app.model.layers.mla import MLAttention
from serve_app.model.layers.mlp import GatedMLP
from serve_app.model.layers.moe import SparseMoeBlock
from serve_app.model.layers.norm import RMSNorm, add_rms_norm
from serve_app.model.layers.rotary import RotaryEmbedding, apply_rotary

# One layer's cache: the tensors of its KVFormat (K and V, or MLA's one latent tensor).
KVCache = tuple[torch.Tensor, ...]


@dataclass(frozen=True, slots=True)
class MicroBatch:
    """One slice of a step's flattened batch, with its own attention metadata."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    lora: LoraBatch | None = None  # each row's adapter, when any row has one


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer_idx: int):
        super().__init__()
        m, h, hkv, d = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, hkv, d
        self.q_proj = nn.Linear(m, h * d, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(m, hkv * d, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(m, hkv * d, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(h * d, m, bias=spec.o_bias)
        self.qk_norm = spec.traits.qk_norm
        if self.qk_norm:
            self.q_norm = RMSNorm(d, spec.rms_norm_eps)
            self.k_norm = RMSNorm(d, spec.rms_norm_eps)
        self.window = spec.sliding_windows[layer_idx]
        self.scale = d**-0.5

    def forward(
        self, x: torch.Tensor, cos_sin: tuple, kv_cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, *cos_sin), apply_rotary(k, *cos_sin)
        o = paged_attention(q, k, v, kv_cache, meta, self.scale, self.window)
        return project(o.reshape(t, -1), self.o_proj)[0]


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer_idx: int):
        super().__init__()
        self.self_attn = (MLAttention if spec.mla is not None else Attention)(spec, layer_idx)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        if spec.moe_layers[layer_idx]:
            ffn: nn.Module = SparseMoeBlock(spec, layer_idx)
        else:
            ffn = GatedMLP(spec.hidden_size, spec.intermediate_size, spec.hidden_act, spec.mlp_bias)
        # Registered under the checkpoint's own name (mlp / block_sparse_moe).
        self.ffn_name = spec.traits.moe_module if spec.moe_layers[layer_idx] else "mlp"
        self.add_module(self.ffn_name, ffn)

    def forward(self, x, cos_sin, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        h, ffn = self.start(x, cos_sin, kv_cache, meta)
        return h + ffn.result()

    def start(
        self, x, cos_sin, kv_cache: KVCache, meta: AttentionMetadata, residual=None
    ) -> tuple[torch.Tensor, ExpertFuture]:
        """Attention, then start the FFN: the layer's output is h + ffn.result(). The layer's
        input is x, or x + residual (the previous layer's FFN output, added in the norm's pass)."""
        if residual is None:
            normed = self.input_layernorm(x)
        else:
            x, normed = add_rms_norm(x, residual, self.input_layernorm)
        attn = self.self_attn(normed, cos_sin, kv_cache, meta)
        h, y = add_rms_norm(x, attn, self.post_attention_layernorm)
        ffn = getattr(self, self.ffn_name)
        return h, ffn.submit(y) if isinstance(ffn, SparseMoeBlock) else DoneFuture(ffn(y))


class DecoderModel(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.rotary = RotaryEmbedding(spec.hf_config, spec.rotary_dim)


class CausalLM(nn.Module):
    """forward() runs the flattened batch; compute_logits() only the rows that sample."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.model = DecoderModel(spec)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)

    def moe_blocks(self) -> list[SparseMoeBlock]:
        return [m for m in self.modules() if isinstance(m, SparseMoeBlock)]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        return self.forward_micro_batches([MicroBatch(input_ids, positions, meta)], kv_caches)[0]

    def forward_micro_batches(
        self, batches: list[MicroBatch], kv_caches: list[KVCache]
    ) -> list[torch.Tensor]:
        """Hidden states of each micro-batch, interleaved layer by layer (ping-pong).

        At layer l, micro-batch i's attention runs while the experts of micro-batch i-1 (and,
        across the layer boundary, of the last one) are still working elsewhere, so remote
        expert time hides behind local attention (MegaScale-Infer). With in-process experts,
        or one micro-batch, this is the plain sequential forward.
        NOTE: micro-batches must not read KV that another one writes in the same step (the
        model runner keeps prefills and new admissions together in one).
        """
        xs = [self.model.embed_tokens(b.input_ids) for b in batches]
        rope = [self.model.rotary.cos_sin(b.positions, xs[0].dtype) for b in batches]
        pending: list[tuple[torch.Tensor, ExpertFuture] | None] = [None] * len(batches)
        for layer, kv in zip(self.model.layers, kv_caches, strict=True):
            for i, b in enumerate(batches):
                with active_batch(b.lora):
                    if pending[i] is None:
                        pending[i] = layer.start(xs[i], rope[i], kv, b.meta)
                    else:
                        h, ffn = pending[i]
                        pending[i] = layer.start(h, rope[i], kv, b.meta, residual=ffn.result())
        out = []
        for p in pending:
            h, ffn = p
            out.append(add_rms_norm(h, ffn.result(), self.model.norm)[1])
        return out

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return project(hidden, self.lm_head)[0]
