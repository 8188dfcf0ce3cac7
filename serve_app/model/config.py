"""One normalised view of the supported HF architectures' config.json.

Each architecture names the same ideas differently (num_experts vs num_local_experts, mlp vs
block_sparse_moe, w1/w3/w2 vs gate/up/down). ModelSpec is the single shape the model code reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig


@dataclass(frozen=True, slots=True)
class ArchTraits:
    """What distinguishes one supported architecture from another."""

    qk_norm: bool  # per-head RMSNorm on q and k (Qwen3)
    moe_module: str | None  # name of the MoE submodule in the checkpoint, None = dense
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    shared_expert: bool = False  # Qwen2-MoE: a dense expert for every token, sigmoid-gated


SUPPORTED_ARCHITECTURES: dict[str, ArchTraits] = {
    "Qwen3MoeForCausalLM": ArchTraits(qk_norm=True, moe_module="mlp"),
    "Qwen2MoeForCausalLM": ArchTraits(qk_norm=False, moe_module="mlp", shared_expert=True),
    "MixtralForCausalLM": ArchTraits(
        qk_norm=False, moe_module="block_sparse_moe", expert_names=("w1", "w3", "w2")
    ),
    "LlamaForCausalLM": ArchTraits(qk_norm=False, moe_module=None),
    "Qwen3ForCausalLM": ArchTraits(qk_norm=True, moe_module=None),
}


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ModelSpec:
    architecture: str
    traits: ArchTraits
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    hidden_act: str
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    sliding_windows: tuple[int | None, ...]  # per layer; None = full attention
    moe_layers: tuple[bool, ...]  # per layer: MoE block or dense MLP
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    shared_expert_intermediate_size: int
    hf_config: PretrainedConfig

    @property
    def is_moe(self) -> bool:
        return any(self.moe_layers)


def load_model_spec(model_dir: str | Path) -> ModelSpec:
    """Read config.json with transformers (for its defaults) and normalise it."""
    cfg = AutoConfig.from_pretrained(str(model_dir))
    return spec_from_hf_config(cfg)


def spec_from_hf_config(cfg: PretrainedConfig) -> ModelSpec:
    archs = getattr(cfg, "architectures", None) or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise UnsupportedModelError(
            f"unsupported architecture {archs or cfg.model_type!r}; "
            f"moeserve supports: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
    traits = SUPPORTED_ARCHITECTURES[arch]
    n_layers = cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    num_experts = int(getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", 0))
    if traits.moe_module is None:
        num_experts = 0
    sparse_step = getattr(cfg, "decoder_sparse_step", 1) or 1
    mlp_only = set(getattr(cfg, "mlp_only_layers", None) or ())
    moe_layers = tuple(
        num_experts > 0 and i not in mlp_only and (i + 1) % sparse_step == 0
        for i in range(n_layers)
    )
    return ModelSpec(
        architecture=arch,
        traits=traits,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        intermediate_size=getattr(cfg, "intermediate_size", 0) or 0,
        rms_norm_eps=cfg.rms_norm_eps,
        hidden_act=cfg.hidden_act,
        # Qwen2-MoE always has q/k/v biases and none on o_proj; Llama/Qwen3 use attention_bias.
        qkv_bias=arch == "Qwen2MoeForCausalLM" or bool(getattr(cfg, "attention_bias", False)),
        o_bias=arch != "Qwen2MoeForCausalLM" and bool(getattr(cfg, "attention_bias", False)),
        mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        max_position_embeddings=cfg.max_position_embeddings,
        sliding_windows=_sliding_windows(cfg, n_layers),
        moe_layers=moe_layers,
        num_experts=num_experts,
        top_k=int(getattr(cfg, "num_experts_per_tok", 0) or 0),
        moe_intermediate_size=int(
            getattr(cfg, "moe_intermediate_size", None) or getattr(cfg, "intermediate_size", 0)
        ),
        # Mixtral always renormalises its top-k weights.
        norm_topk_prob=bool(getattr(cfg, "norm_topk_prob", arch == "MixtralForCausalLM")),
        shared_expert_intermediate_size=int(getattr(cfg, "shared_expert_intermediate_size", 0) or 0)
        if traits.shared_expert
        else 0,
        hf_config=cfg,
    )


def _sliding_windows(cfg: PretrainedConfig, n_layers: int) -> tuple[int | None, ...]:
    window = getattr(cfg, "sliding_window", None) or None
    layer_types = getattr(cfg, "layer_types", None)
    if window is None:
        return (None,) * n_layers
    if layer_types:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    return (window,) * n_layers
