"""Write small random-weight Hugging Face checkpoints for tests and benchmarks.

There is no model hub in our environment, so every test model is generated here: a config
for one of the supported architectures, seeded random weights, and the corpus-trained
tokenizer. The output directory is a regular HF checkpoint (``config.json``,
``model.safetensors``, ``generation_config.json``, tokenizer files) that both transformers
and our own loader read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import torch
import transformers
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel

from serve_app.tools.presets import DEEPSEEK_PRESETS, PRESETS, Preset
from serve_app.tools.tokenizer import ENDOFTEXT, IM_END, train_tokenizer


class TokenIds(NamedTuple):
    eos: int  # <|endoftext|>: end of document, also used as padding
    im_end: int  # <|im_end|>: end of a chat turn


def _common(p: Preset, vocab_size: int, ids: TokenIds) -> dict:
    # Fields every supported config class accepts with the same meaning.
    return dict(
        vocab_size=vocab_size,
        hidden_size=p.hidden_size,
        num_hidden_layers=p.num_layers,
        num_attention_heads=p.num_heads,
        num_key_value_heads=p.num_kv_heads,
        head_dim=p.head_dim,
        hidden_act="silu",
        max_position_embeddings=p.max_position_embeddings,
        initializer_range=p.initializer_range,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": p.rope_theta},
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=ids.eos,
        pad_token_id=ids.eos,
        dtype=torch.float32,
    )


def _qwen3_moe(p: Preset, common: dict) -> PretrainedConfig:
    return transformers.Qwen3MoeConfig(
        **common,
        intermediate_size=p.dense_intermediate,
        moe_intermediate_size=p.moe_intermediate,
        num_experts=p.num_experts,
        num_experts_per_tok=p.top_k,
        # Qwen3-30B-A3B renormalizes the top-k weights; Qwen2-MoE below does not.
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        use_sliding_window=False,
    )


def _qwen2_moe(p: Preset, common: dict) -> PretrainedConfig:
    return transformers.Qwen2MoeConfig(
        **common,
        intermediate_size=p.dense_intermediate,
        moe_intermediate_size=p.moe_intermediate,
        shared_expert_intermediate_size=p.shared_intermediate,
        num_experts=p.num_experts,
        num_experts_per_tok=p.top_k,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        qkv_bias=True,
        use_sliding_window=False,
    )


def _mixtral(p: Preset, common: dict) -> PretrainedConfig:
    return transformers.MixtralConfig(
        **common,
        intermediate_size=p.moe_intermediate,
        num_local_experts=p.num_experts,
        num_experts_per_tok=p.top_k,
        sliding_window=p.mixtral_sliding_window,
    )


def _llama(p: Preset, common: dict) -> PretrainedConfig:
    return transformers.LlamaConfig(**common, intermediate_size=p.dense_intermediate)


def _deepseek_common(p: Preset, common: dict) -> dict:
    m = p.mla
    assert m is not None, "DeepSeek archs need an MLA preset"
    rope = {"rope_type": "default", "rope_theta": p.rope_theta}
    if m.yarn_factor is not None:
        rope = {
            "rope_type": "yarn",
            "rope_theta": p.rope_theta,
            "factor": m.yarn_factor,
            "original_max_position_embeddings": m.yarn_original_max_position,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        }
    kw = {k: v for k, v in common.items() if k not in ("head_dim", "rope_parameters")}
    return dict(
        kw,
        rope_parameters=rope,
        intermediate_size=p.dense_intermediate,
        moe_intermediate_size=p.moe_intermediate,
        n_routed_experts=p.num_experts,
        num_experts_per_tok=p.top_k,
        n_shared_experts=m.n_shared_experts,
        first_k_dense_replace=m.first_k_dense_replace,
        q_lora_rank=m.q_lora_rank,
        kv_lora_rank=m.kv_lora_rank,
        qk_nope_head_dim=m.qk_nope_head_dim,
        qk_rope_head_dim=m.qk_rope_head_dim,
        v_head_dim=m.v_head_dim,
        n_group=m.n_group,
        topk_group=m.topk_group,
        routed_scaling_factor=m.routed_scaling_factor,
    )


def _deepseek_v3(p: Preset, common: dict) -> PretrainedConfig:
    # topk_method / scoring_func: DeepSeek's own V3 configs carry them and vLLM needs them
    # (without, it fails at load on e_score_correction_bias); transformers keeps them as is.
    return transformers.DeepseekV3Config(
        **_deepseek_common(p, common),
        norm_topk_prob=True,
        rope_interleave=True,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
    )


def _deepseek_v2(p: Preset, common: dict) -> PretrainedConfig:
    return transformers.DeepseekV2Config(
        **_deepseek_common(p, common), topk_method="group_limited_greedy", norm_topk_prob=False
    )


@dataclass(frozen=True, slots=True)
class Arch:
    model_class: str  # attribute of `transformers`; also lands in config.architectures
    build_config: Callable[[Preset, dict], PretrainedConfig]
    is_moe: bool
    presets: dict[str, Preset] = None  # type: ignore[assignment]  # None: PRESETS

    @property
    def preset_table(self) -> dict[str, Preset]:
        return self.presets if self.presets is not None else PRESETS


ARCHS: dict[str, Arch] = {
    "qwen3_moe": Arch("Qwen3MoeForCausalLM", _qwen3_moe, is_moe=True),
    "qwen2_moe": Arch("Qwen2MoeForCausalLM", _qwen2_moe, is_moe=True),
    "mixtral": Arch("MixtralForCausalLM", _mixtral, is_moe=True),
    "llama": Arch("LlamaForCausalLM", _llama, is_moe=False),
    "deepseek_v3": Arch("DeepseekV3ForCausalLM", _deepseek_v3, True, DEEPSEEK_PRESETS),
    "deepseek_v2": Arch("DeepseekV2ForCausalLM", _deepseek_v2, True, DEEPSEEK_PRESETS),
}


class ParamCount(NamedTuple):
    total: int
    active: int  # parameters touched per token: unrouted experts excluded


def count_parameters(model: PreTrainedModel, arch: str, preset: Preset) -> ParamCount:
    """Total and per-token-active parameter counts of a model built by `build_model`."""
    total = sum(t.numel() for t in model.parameters())
    if not ARCHS[arch].is_moe:
        return ParamCount(total, total)
    per_expert = 3 * preset.hidden_size * preset.moe_intermediate  # gate, up, down
    moe_layers = preset.num_layers - (preset.mla.first_k_dense_replace if preset.mla else 0)
    idle = moe_layers * (preset.num_experts - preset.top_k) * per_expert
    return ParamCount(total, total - idle)


def resolve(arch: str, preset: str) -> tuple[Arch, Preset]:
    """Look up an architecture and preset by name, naming the valid choices on failure."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; supported: {', '.join(ARCHS)}")
    table = ARCHS[arch].preset_table
    if preset not in table:
        raise ValueError(f"unknown preset {preset!r}; supported: {', '.join(table)}")
    return ARCHS[arch], table[preset]


@dataclass(frozen=True, slots=True)
class Variant:
    """Changes to a preset, for tests of config variants (odd shapes, no q LoRA, another
    routing method): fields of Preset, of its MLAPreset, and plain config attributes."""

    preset: dict = field(default_factory=dict)
    mla: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def apply(self, p: Preset) -> Preset:
        p = replace(p, **self.preset)
        return replace(p, mla=replace(p.mla, **self.mla)) if self.mla else p


# DeepSeek-V3's e_score_correction_bias (selection only) gets random values, as trained
# checkpoints have, so that tests see it change which experts are picked.
_ROUTING_BIAS_STD = 0.2


def build_model(
    arch: str,
    preset: str,
    vocab_size: int,
    ids: TokenIds,
    seed: int,
    variant: Variant | None = None,
) -> PreTrainedModel:
    """Build the seeded random-weight model in memory (float32, CPU)."""
    spec, p = resolve(arch, preset)
    variant = variant or Variant()
    p = variant.apply(p)
    config = spec.build_config(p, _common(p, vocab_size, ids))
    for key, value in variant.config.items():
        setattr(config, key, value)
    config.architectures = [spec.model_class]
    # Seed immediately before construction, so the weights are a pure function of
    # (arch, preset, seed) whatever torch randomness the caller drew earlier.
    torch.manual_seed(seed)
    model = getattr(transformers, spec.model_class)(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, _ROUTING_BIAS_STD)
    model.generation_config = GenerationConfig(
        bos_token_id=None,
        # Chat turns end with <|im_end|>, raw completions with <|endoftext|>.
        eos_token_id=[ids.im_end, ids.eos],
        pad_token_id=ids.eos,
        do_sample=False,
    )
    return model


def make_model(
    arch: str, preset: str, out: str | Path, seed: int, variant: Variant | None = None
) -> Path:
    """Write a random-weight checkpoint plus tokenizer for ``arch``/``preset`` to ``out``.

    The same (arch, preset, seed) always produces byte-identical ``model.safetensors``.
    Returns the output directory.
    """
    _, p = resolve(arch, preset)
    p = (variant or Variant()).apply(p)
    out = Path(out)
    tokenizer = train_tokenizer(p.vocab_size, out)
    tokenizer.model_max_length = p.max_position_embeddings
    ids = TokenIds(
        eos=tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        im_end=tokenizer.convert_tokens_to_ids(IM_END),
    )
    # NOTE: len(tokenizer), not p.vocab_size: the BPE trainer may stop short of the target,
    # and the embedding must cover exactly the ids the tokenizer can produce.
    model = build_model(arch, preset, len(tokenizer), ids, seed, variant)
    # 1 GB shards: files vLLM and our loader read as one checkpoint; tiny and small still fit
    # one model.safetensors, byte-identical as before. NOTE: the save first copies the fused
    # expert weights into per-expert tensors (transformers' revert_weight_conversion, whole
    # model): the peak is ~1.7x the fp32 weights (qwen3_moe medium: 7.4 GB).
    model.save_pretrained(out, safe_serialization=True, max_shard_size="1GB")
    tokenizer.save_pretrained(out)
    n = count_parameters(model, arch, p)
    print(f"{arch}/{preset}: {n.total / 1e6:.2f}M parameters ({n.active / 1e6:.2f}M active)")
    return out
