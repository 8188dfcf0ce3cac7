"""Rotary position embeddings for flattened token batches.

Frequencies come from transformers' own rope initialisers, so every rope_type a checkpoint may
declare (default, linear, llama3, yarn, ...) gets the same inv_freq and scaling as in HF.
Shapes: T tokens, H heads, D head_dim.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


def rope_frequencies(cfg: PretrainedConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [D/2], attention_scaling) for the checkpoint's rope settings."""
    params = getattr(cfg, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        return inv_freq, 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS or rope_type == "dynamic":
        raise ValueError(f"unsupported rope_type {rope_type!r}")
    with torch.device("cpu"):  # also when the model is built on the meta device
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu")
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, cfg: PretrainedConfig, head_dim: int):
        super().__init__()
        inv_freq, self.scaling = rope_frequencies(cfg, head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """cos, sin of shape [T, 1, D] for broadcasting over heads."""
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.scaling).to(dtype)[:, None, :]
        sin = (emb.sin() * self.scaling).to(dtype)[:, None, :]
        return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated by the half-split convention of HF's rotate_half."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
