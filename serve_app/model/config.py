"""One normalised view of the supported HF architectures' config.json.

Each architecture names the same ideas differently (num_experts vs num_local_experts vs
n_routed_experts, mlp vs block_sparse_moe, w1/w3/w2 vs gate/up/down, rope_scaling vs
rope_parameters). ModelSpec is the single shape the model code reads; it is loaded once per
process and passed down.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig
from transformers.modeling_rope_utils import yarn_apply_mscale

from serve_app.model.kv_format import KVFormat


@dataclass(frozen=True, slots=True)
class ArchTraits:
    """What distinguishes one supported architecture from another."""

    qk_norm: bool  # per-head RMSNorm on q and k (Qwen3)
    moe_module: str | None  # name of the MoE submodule in the checkpoint, None = dense
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    # A dense expert for every token: "gated" (Qwen2-MoE: `shared_expert`, scaled by a sigmoid
    # gate) or "plain" (DeepSeek: `shared_experts`, n_shared_experts of them as one MLP, added).
    shared_expert: str | None = None
    mla: bool = False  # DeepSeek's multi-head latent attention (a latent KV cache)


SUPPORTED_ARCHITECTURES: dict[str, ArchTraits] = {
    "Qwen3MoeForCausalLM": ArchTraits(qk_norm=True, moe_module="mlp"),
    "Qwen2MoeForCausalLM": ArchTraits(qk_norm=False, moe_module="mlp", shared_expert="gated"),
    "MixtralForCausalLM": ArchTraits(
        qk_norm=False, moe_module="block_sparse_moe", expert_names=("w1", "w3", "w2")
    ),
    "LlamaForCausalLM": ArchTraits(qk_norm=False, moe_module=None),
    "Qwen3ForCausalLM": ArchTraits(qk_norm=True, moe_module=None),
    "DeepseekV2ForCausalLM": ArchTraits(
        qk_norm=False, moe_module="mlp", shared_expert="plain", mla=True
    ),
    "DeepseekV3ForCausalLM": ArchTraits(
        qk_norm=False, moe_module="mlp", shared_expert="plain", mla=True
    ),
}
# How the MoE gate picks experts (serve_app/model/layers/routing.py has one class per method).
ROUTING_METHODS = ("softmax", "greedy", "group_limited_greedy", "noaux_tc")


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class MLASpec:
    """DeepSeek's multi-head latent attention. Per token the cache keeps the compressed latent
    (kv_lora_rank) and the shared rope key (qk_rope_head_dim), never the expanded K/V."""

    q_lora_rank: int | None  # None: one q_proj; else q_a_proj -> q_a_layernorm -> q_b_proj
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool  # checkpoint's rope dims in (x0, x1) pairs (V2 always, V3 by config)
    softmax_scale: float  # (nope + rope) ** -0.5, times yarn's mscale(factor, mscale_all_dim)^2

    @property
    def latent_dim(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass(frozen=True, slots=True)
class RoutingSpec:
    """How the gate turns logits into top-k experts and weights (transformers' semantics).

    softmax: softmax, top-k, renormalised when norm_topk_prob (Qwen, Mixtral).
    greedy / group_limited_greedy: DeepSeek-V2, softmax then top-k, optionally only within the
    topk_group groups of best single expert; weights times `scaling`, never renormalised.
    noaux_tc: DeepSeek-V3, sigmoid scores; the choice adds e_score_correction_bias and keeps the
    topk_group groups whose two best sum highest; weights (without the bias) renormalised when
    norm_topk_prob, times `scaling`. DeepSeek gates run in float32.
    """

    method: str  # one of ROUTING_METHODS
    top_k: int
    norm_topk_prob: bool
    n_group: int = 1
    topk_group: int = 1
    scaling: float = 1.0  # routed_scaling_factor

    @property
    def fp32_gate(self) -> bool:
        return self.method != "softmax"


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
    routing: RoutingSpec
    shared_expert_intermediate_size: int
    hf_config: PretrainedConfig
    mla: MLASpec | None = None

    @property
    def is_moe(self) -> bool:
        return any(self.moe_layers)

    @property
    def rotary_dim(self) -> int:
        """Dims that rope rotates per head: the whole head, or MLA's rope part."""
        return self.mla.qk_rope_head_dim if self.mla is not None else self.head_dim

    @property
    def kv_format(self) -> KVFormat:
        if self.mla is not None:
            m = self.mla
            return KVFormat("mla", 1, 1, m.latent_dim, (m.kv_lora_rank, m.qk_rope_head_dim))
        return KVFormat("mha", 2, self.num_kv_heads, self.head_dim, (self.head_dim,))


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
    num_experts = int(
        getattr(cfg, "n_routed_experts", None)
        or getattr(cfg, "num_experts", None)
        or getattr(cfg, "num_local_experts", 0)
        or 0
    )
    if traits.moe_module is None:
        num_experts = 0
    moe_layers = _moe_layers(cfg, n_layers, num_experts)
    return ModelSpec(
        architecture=arch,
        traits=traits,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=_head_dim(cfg, traits),
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
        top_k=_top_k(cfg),
        moe_intermediate_size=int(
            getattr(cfg, "moe_intermediate_size", None) or getattr(cfg, "intermediate_size", 0)
        ),
        routing=_routing(cfg, arch, num_experts),
        shared_expert_intermediate_size=_shared_intermediate(cfg, traits),
        hf_config=cfg,
        mla=_mla(cfg) if traits.mla else None,
    )


def _top_k(cfg: PretrainedConfig) -> int:
    return int(getattr(cfg, "num_experts_per_tok", 0) or 0)


def _head_dim(cfg: PretrainedConfig, traits: ArchTraits) -> int:
    if traits.mla:  # the expanded query/key head: nope + rope dims
        return int(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _moe_layers(cfg: PretrainedConfig, n_layers: int, num_experts: int) -> tuple[bool, ...]:
    """Per layer: MoE or dense. Qwen: decoder_sparse_step + mlp_only_layers; DeepSeek: the
    first first_k_dense_replace layers dense (moe_layer_freq is ignored, as transformers does)."""
    first_dense = int(getattr(cfg, "first_k_dense_replace", 0) or 0)
    sparse_step = getattr(cfg, "decoder_sparse_step", 1) or 1
    mlp_only = set(getattr(cfg, "mlp_only_layers", None) or ())
    return tuple(
        num_experts > 0 and i not in mlp_only and (i + 1) % sparse_step == 0 and i >= first_dense
        for i in range(n_layers)
    )


def _shared_intermediate(cfg: PretrainedConfig, traits: ArchTraits) -> int:
    if traits.shared_expert == "gated":
        return int(getattr(cfg, "shared_expert_intermediate_size", 0) or 0)
    if traits.shared_expert == "plain":
        return int(cfg.moe_intermediate_size * (getattr(cfg, "n_shared_experts", 0) or 0))
    return 0


def _routing(cfg: PretrainedConfig, arch: str, num_experts: int) -> RoutingSpec:
    top_k = _top_k(cfg)
    if not SUPPORTED_ARCHITECTURES[arch].mla:
        # Mixtral always renormalises its top-k weights.
        norm = bool(getattr(cfg, "norm_topk_prob", arch == "MixtralForCausalLM"))
        return RoutingSpec("softmax", top_k, norm)
    scaling = float(getattr(cfg, "routed_scaling_factor", 1.0) or 1.0)
    n_group = int(getattr(cfg, "n_group", None) or 1)
    topk_group = int(getattr(cfg, "topk_group", None) or 1)
    if arch == "DeepseekV3ForCausalLM":
        # transformers' V3 gate always scores by sigmoid + correction bias (DeepSeek's
        # "noaux_tc"); a config naming anything else would be served differently, so refuse it.
        method = getattr(cfg, "topk_method", "noaux_tc") or "noaux_tc"
        scoring = getattr(cfg, "scoring_func", "sigmoid") or "sigmoid"
        if method != "noaux_tc" or scoring != "sigmoid":
            raise UnsupportedModelError(
                f"DeepSeek-V3 routing topk_method={method!r} scoring_func={scoring!r}: "
                "supported is noaux_tc with sigmoid"
            )
        norm = bool(getattr(cfg, "norm_topk_prob", True))
    else:
        method = getattr(cfg, "topk_method", "greedy") or "greedy"
        if method not in ("greedy", "group_limited_greedy"):
            raise UnsupportedModelError(
                f"DeepSeek-V2 topk_method {method!r}: supported are greedy, group_limited_greedy"
            )
        norm = False  # transformers' V2 gate never renormalises
    if method != "greedy":
        if num_experts % n_group or not 1 <= topk_group <= n_group:
            raise UnsupportedModelError(
                f"grouped routing needs n_group dividing {num_experts} experts and "
                f"1 <= topk_group <= n_group, got n_group={n_group} topk_group={topk_group}"
            )
        if top_k > topk_group * (num_experts // n_group):
            raise UnsupportedModelError(
                f"num_experts_per_tok {top_k} exceeds the experts in {topk_group} groups"
            )
    return RoutingSpec(method, top_k, norm, n_group, topk_group, scaling)


def _mla(cfg: PretrainedConfig) -> MLASpec:
    nope, rope = int(cfg.qk_nope_head_dim), int(cfg.qk_rope_head_dim)
    if rope % 2:
        raise UnsupportedModelError(f"qk_rope_head_dim must be even, got {rope}")
    params = getattr(cfg, "rope_parameters", None) or {}
    interleave = cfg.model_type == "deepseek_v2" or bool(getattr(cfg, "rope_interleave", True))
    return MLASpec(
        q_lora_rank=int(cfg.q_lora_rank) if getattr(cfg, "q_lora_rank", None) else None,
        kv_lora_rank=int(cfg.kv_lora_rank),
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope,
        v_head_dim=int(cfg.v_head_dim),
        rope_interleave=interleave,
        softmax_scale=float(yarn_apply_mscale(params, (nope + rope) ** -0.5)),
    )


def _sliding_windows(cfg: PretrainedConfig, n_layers: int) -> tuple[int | None, ...]:
    window = getattr(cfg, "sliding_window", None) or None
    layer_types = getattr(cfg, "layer_types", None)
    if window is None:
        return (None,) * n_layers
    if layer_types:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    return (window,) * n_layers
