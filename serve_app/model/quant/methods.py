"""The quantization methods and which checkpoint tensors they apply to (no torch: the engine's
config validates against these).

Quantized: every linear of the decoder layers, routed and shared experts included. Float: the
MoE routers (`mlp.gate`, Qwen2-MoE's `shared_expert_gate`), MLA's `kv_b_proj` (split at load
into the absorbed W_UK / W_UV, serve_app/model/layers/mla.py), norms, embeddings, the LM head.
"""

from __future__ import annotations

METHODS = ("none", "int8", "int4")  # engine.quantization's values
# bf16 weight storage: not a user-facing quantization but what `engine.dtype: bfloat16` on the
# CPU means for the weights (serve_app/model/quant/precision.py); it also holds the LM head and
# the embeddings (their values: the embedding table stays a float32 gather)
BF16 = "bf16"
BF16_EXTRA = frozenset({"lm_head.weight", "model.embed_tokens.weight"})
GROUP_SIZES = (128, 64, 32)  # int4 groups along K; the default is the largest dividing K
FLOAT_MODULES = frozenset({"gate", "shared_expert_gate", "kv_b_proj"})


def quantizes(name: str, method: str = "int8") -> bool:
    """Whether the checkpoint tensor `name` is quantized (when quantization is on): a linear's
    `weight`, or the fused experts' `gate_up_proj` / `down_proj`, under model.layers; with bf16
    the LM head and the embeddings too."""
    if method == BF16 and name in BF16_EXTRA:
        return True
    parts = name.split(".")
    if not name.startswith("model.layers.") or len(parts) < 4:
        return False
    if parts[-1] in ("gate_up_proj", "down_proj"):
        return parts[-2] == "experts"
    return parts[-1] == "weight" and parts[-2] not in FLOAT_MODULES and "norm" not in parts[-2]
