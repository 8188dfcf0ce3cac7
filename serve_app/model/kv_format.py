"""What the paged KV cache holds per token and layer: the one description every KV consumer reads.

The model runner allocates `parts` tensors [N, B, heads, dim] per layer; the shared prefix tier
ships a block as [L, parts, B, heads, dim] and quantises it with one INT8 scale per
(layer, part, head, segment). Two formats exist:
  mha  K and V (2 parts) of num_kv_heads heads of head_dim (Llama, Qwen, Mixtral);
  mla  one latent row (1 part, 1 head): DeepSeek's compressed kv (kv_lora_rank) followed by the
       roped shared key (qk_rope_head_dim), segments (kv_lora_rank, qk_rope_head_dim): the two
       parts have different ranges, so INT8 scales them separately.
`tag` names the format in the model digest, so blocks of one format are never served to the
other (the digest namespaces every block hash, locally and in Redis).
"""

from __future__ import annotations

from dataclasses import dataclass

# How a cached rope key is laid out: rotate_half pairs (i, i + d/2). Interleaved checkpoints
# (DeepSeek's (x0, x1) pairs) are permuted into this layout at load (serve_app/model/layers/mla.py).
ROPE_LAYOUT = "rotate_half"


@dataclass(frozen=True, slots=True)
class KVFormat:
    name: str  # "mha" | "mla"
    parts: int  # tensors per layer: 2 (K, V) or 1 (latent row)
    heads: int  # rows per token and part
    dim: int  # floats per row
    segments: tuple[int, ...]  # INT8 scale groups along dim, summing to dim

    def __post_init__(self) -> None:
        if sum(self.segments) != self.dim or min(self.segments) < 1:
            raise ValueError(f"segments {self.segments} must be positive and sum to {self.dim}")
        if self.parts not in (1, 2) or self.heads < 1:
            raise ValueError(f"bad KV format: {self.parts} parts of {self.heads} heads")

    def elements_per_token(self, num_layers: int) -> int:
        return num_layers * self.parts * self.heads * self.dim

    def tag(self) -> str:
        """e.g. 'mha:2x4x64' or 'mla:1x1x576:512+64:rotate_half'."""
        base = f"{self.name}:{self.parts}x{self.heads}x{self.dim}"
        if self.name == "mla":
            return f"{base}:{'+'.join(map(str, self.segments))}:{ROPE_LAYOUT}"
        return base
