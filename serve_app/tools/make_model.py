"""Write small random-weight Hugging Face checkpoints for tests and benchmarks.

There is no model hub in our environment, so every test model is generated here: a config
for one of the supported architectures, seeded random weights, and the corpus-trained
tokenizer. The output directory is a regular HF checkpoint (``config.json``,
``model.safetensors``, ``generation_config.json``, tokenizer files) that both transformers
and our own loader read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import transformers
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel

from serve_app.tools.tokenizer import ENDOFTEXT, IM_END, train_tokenizer


@dataclass(frozen=True, slots=True)
class Preset:
    """Model dimensions shared by all architectures; each arch uses the fields it needs."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    moe_intermediate: int
    # Qwen2-MoE's always-on shared expert, gated by a sigmoid.
    shared_intermediate: int
    # Dense MLP width for llama; the MoE archs only use it for dense (mlp_only) layers.
    dense_intermediate: int
    vocab_size: int
    max_position_embeddings: int
    # Only Mixtral gets a window, so that one tiny arch exercises sliding-window attention.
    mixtral_sliding_window: int | None
    # NOTE: far above the usual 0.02. At 0.02 random models give nearly flat logits (std
    # ~0.16 on tiny), greedy decoding is degenerate and two implementations diverge on
    # near-ties. We pick it so that sqrt(hidden_size) * initializer_range ~= 2.3, the logit
    # std: median top-1/top-2 gap ~0.5, router top-k margins likewise wide, and attention
    # scores not yet one-hot. Changing it changes every generated checkpoint.
    initializer_range: float
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} not a multiple of {self.num_kv_heads}")
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, {self.num_experts}], got {self.top_k}")


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        num_experts=8,
        top_k=2,
        moe_intermediate=32,
        shared_intermediate=64,
        dense_intermediate=128,
        vocab_size=512,
        max_position_embeddings=2048,
        mixtral_sliding_window=48,
        initializer_range=0.3,
    ),
    "small": Preset(
        hidden_size=512,
        num_layers=8,
        num_heads=8,
        num_kv_heads=4,
        head_dim=64,
        num_experts=16,
        top_k=2,
        moe_intermediate=1024,
        shared_intermediate=1024,
        # Equal to top_k * moe_intermediate, so dense llama matches the MoE models' active size.
        dense_intermediate=2048,
        vocab_size=4096,
        max_position_embeddings=4096,
        mixtral_sliding_window=None,
        initializer_range=0.1,
    ),
}


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


@dataclass(frozen=True, slots=True)
class Arch:
    model_class: str  # attribute of `transformers`; also lands in config.architectures
    build_config: Callable[[Preset, dict], PretrainedConfig]
    is_moe: bool


ARCHS: dict[str, Arch] = {
    "qwen3_moe": Arch("Qwen3MoeForCausalLM", _qwen3_moe, is_moe=True),
    "qwen2_moe": Arch("Qwen2MoeForCausalLM", _qwen2_moe, is_moe=True),
    "mixtral": Arch("MixtralForCausalLM", _mixtral, is_moe=True),
    "llama": Arch("LlamaForCausalLM", _llama, is_moe=False),
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
    idle = preset.num_layers * (preset.num_experts - preset.top_k) * per_expert
    return ParamCount(total, total - idle)


def resolve(arch: str, preset: str) -> tuple[Arch, Preset]:
    """Look up an architecture and preset by name, naming the valid choices on failure."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; supported: {', '.join(ARCHS)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; supported: {', '.join(PRESETS)}")
    return ARCHS[arch], PRESETS[preset]


def build_model(
    arch: str, preset: str, vocab_size: int, ids: TokenIds, seed: int
) -> PreTrainedModel:
    """Build the seeded random-weight model in memory (float32, CPU)."""
    spec, p = resolve(arch, preset)
    config = spec.build_config(p, _common(p, vocab_size, ids))
    config.architectures = [spec.model_class]
    # Seed immediately before construction, so the weights are a pure function of
    # (arch, preset, seed) whatever torch randomness the caller drew earlier.
    torch.manual_seed(seed)
    model = getattr(transformers, spec.model_class)(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=None,
        # Chat turns end with <|im_end|>, raw completions with <|endoftext|>.
        eos_token_id=[ids.im_end, ids.eos],
        pad_token_id=ids.eos,
        do_sample=False,
    )
    return model


def make_model(arch: str, preset: str, out: str | Path, seed: int) -> Path:
    """Write a random-weight checkpoint plus tokenizer for ``arch``/``preset`` to ``out``.

    The same (arch, preset, seed) always produces byte-identical ``model.safetensors``.
    Returns the output directory.
    """
    _, p = resolve(arch, preset)
    out = Path(out)
    tokenizer = train_tokenizer(p.vocab_size, out)
    tokenizer.model_max_length = p.max_position_embeddings
    ids = TokenIds(
        eos=tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        im_end=tokenizer.convert_tokens_to_ids(IM_END),
    )
    # NOTE: len(tokenizer), not p.vocab_size: the BPE trainer may stop short of the target,
    # and the embedding must cover exactly the ids the tokenizer can produce.
    model = build_model(arch, preset, len(tokenizer), ids, seed)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    n = count_parameters(model, arch, p)
    print(f"{arch}/{preset}: {n.total / 1e6:.2f}M parameters ({n.active / 1e6:.2f}M active)")
    return out
