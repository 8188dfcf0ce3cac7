"""The presets `moeserve make-model` builds: the sizes of each architecture's random
checkpoints (tiny for tests, small and medium for benchmarks), as plain data."""

from __future__ import annotations

from dataclasses import dataclass


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
    mla: MLAPreset | None = None  # DeepSeek archs only

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} not a multiple of {self.num_kv_heads}")
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, {self.num_experts}], got {self.top_k}")


@dataclass(frozen=True, slots=True)
class MLAPreset:
    """DeepSeek's attention and routing dimensions (the archs' own config names)."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    first_k_dense_replace: int
    n_shared_experts: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    # yarn rope (DeepSeek-V3 ships factor 40 over 4096); None: default rope
    yarn_factor: float | None
    yarn_original_max_position: int = 0


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
    # Benchmarks only, never tests: ~1.1B parameters (4.4 GB in fp32), far beyond a 32 MB L3, so
    # a decode step streams its active weights from memory as a real MoE does. The MoE archs
    # take Qwen3-30B-A3B's proportions (top-8 of 64 small experts, 4 KV heads); llama is dense
    # at the MoE models' active size (dense_intermediate = top_k * moe_intermediate).
    "medium": Preset(
        hidden_size=1024,
        num_layers=14,
        num_heads=16,
        num_kv_heads=4,
        head_dim=64,
        num_experts=64,
        top_k=8,
        moe_intermediate=384,
        shared_intermediate=1536,
        dense_intermediate=3072,
        vocab_size=4096,
        max_position_embeddings=4096,
        mixtral_sliding_window=None,
        initializer_range=0.07,
    ),
}


# DeepSeek presets. tiny: small odd-free dims for tests (latent 48 + rope 16 = 64 per token).
# small: DeepSeek-V3's real attention shapes (kv_lora_rank 512, rope 64, nope 128, v 128, q LoRA)
# with fewer layers and experts, so vLLM's CPU MLA kernels (576 = 512 + 64) run the same
# checkpoint; the shape measured in shared/PEERS.md (~114M parameters).
DEEPSEEK_PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        hidden_size=64,
        num_layers=3,
        num_heads=4,
        num_kv_heads=4,
        head_dim=16,
        num_experts=8,
        top_k=2,
        moe_intermediate=32,
        shared_intermediate=32,
        dense_intermediate=128,
        vocab_size=512,
        max_position_embeddings=2048,
        mixtral_sliding_window=None,
        initializer_range=0.3,
        mla=MLAPreset(
            q_lora_rank=32,
            kv_lora_rank=48,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
            first_k_dense_replace=1,
            n_shared_experts=1,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            yarn_factor=4.0,
            yarn_original_max_position=512,
        ),
    ),
    "small": Preset(
        hidden_size=1024,
        num_layers=4,
        num_heads=16,
        num_kv_heads=16,
        head_dim=64,
        num_experts=32,
        top_k=4,
        moe_intermediate=512,
        shared_intermediate=512,
        dense_intermediate=2048,
        vocab_size=4096,
        max_position_embeddings=4096,
        mixtral_sliding_window=None,
        initializer_range=0.06,
        mla=MLAPreset(
            q_lora_rank=384,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            first_k_dense_replace=1,
            n_shared_experts=1,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            yarn_factor=4.0,
            yarn_original_max_position=1024,
        ),
    ),
    # Benchmarks only: small's MLA shapes, 11 layers (the first dense) of 64 routed experts,
    # top-6 in 8 groups (4 kept) and 1 shared: ~1.1B parameters, ~0.2B active.
    "medium": Preset(
        hidden_size=1024,
        num_layers=11,
        num_heads=16,
        num_kv_heads=16,
        head_dim=64,
        num_experts=64,
        top_k=6,
        moe_intermediate=512,
        shared_intermediate=512,
        dense_intermediate=2048,
        vocab_size=4096,
        max_position_embeddings=4096,
        mixtral_sliding_window=None,
        initializer_range=0.06,
        mla=MLAPreset(
            q_lora_rank=384,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            first_k_dense_replace=1,
            n_shared_experts=1,
            n_group=8,
            topk_group=4,
            routed_scaling_factor=2.5,
            yarn_factor=4.0,
            yarn_original_max_position=1024,
        ),
    ),
}
