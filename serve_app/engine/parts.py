"""build_parts: everything a router replica's engine runs on, built once.

The model spec is loaded once per process by the caller (serve_app/runtime/factory.py) and
passed down; from it this builds the tokenizer, the model over the given experts, the KV pool's
size and the model runner that holds it, the model digest (the prefix cache's namespace) and
the shared-prefix connector over that pool. LLMEngine then only holds the loop: the block
manager, the scheduler and the requests.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoTokenizer, GenerationConfig

from serve_app.engine.config import ConfigError, EngineConfig
from serve_app.engine.kv_budget import kv_memory, num_kv_blocks
from serve_app.engine.kv_connector import KVConnector, KVConnectorFactory
from serve_app.engine.model_runner import ModelRunner, kv_block_bytes
from serve_app.lora.memory import lora_budget_bytes, max_adapter_bytes
from serve_app.lora.registry import LoraLimits, LoraRegistry
from serve_app.model import lora_targets
from serve_app.model.config import ModelSpec
from serve_app.model.digest import model_digest
from serve_app.model.expert_executor import ExpertExecutor
from serve_app.model.layers.moe import count_expert_tokens
from serve_app.model.loader import base_shapes, load_model
from serve_app.model.quant.checkpoint import held_quantization
from serve_app.model.quant.formats import checkpoint_format
from serve_app.model.quant.linear import weight_bytes
from serve_app.model.quant.precision import precision
from serve_app.model.quant.scheme import Quantization
from serve_app.platform.device import resolve_device, resolve_dtype, tune_host_allocator

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineParts:
    """What LLMEngine runs on; the connector (if any) is open over the runner's KV pool."""

    config: EngineConfig
    spec: ModelSpec
    tokenizer: Any
    eos_token_ids: frozenset[int]
    runner: ModelRunner  # the model, its KV pool of num_kv_blocks blocks, the sampler
    num_kv_blocks: int
    lora_kv_blocks: int  # blocks the pool gave up to the LoRA adapters' reserve
    kv_block_bytes: int  # one block in the pool, all layers (K/V or MLA latent rows)
    kv_dtype: torch.dtype  # what the pool holds (bfloat16 under the CPU's bf16 float32 compute)
    max_model_len: int  # the model's limit (or config.max_model_len), at most the pool's
    model_digest: str
    connector: KVConnector | None
    expert_token_counts: torch.Tensor | None  # tokens routed per expert (in-process counts)
    weight_bytes: int  # the replica's weights as held (quantized or not), in-process experts too
    quantization: str  # Quantization.tag() of those weights ("none", "int8", "int4-g128")
    lora: LoraRegistry  # the LoRA adapters requests may name (config.lora_adapters at start)


def build_parts(
    config: EngineConfig,
    spec: ModelSpec,
    experts: ExpertExecutor,
    connector: KVConnectorFactory | None = None,
) -> EngineParts:
    """Run on the engine's own thread: torch's thread count is set for it first."""
    if connector is not None and not config.enable_prefix_caching:
        raise ConfigError("enable_prefix_caching", "must be on for a shared-prefix connector")
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)  # on the engine thread: see async_engine
    device = resolve_device(config.device)
    tune_host_allocator()
    # bfloat16 on the CPU: bf16 weights and KV cache, float32 compute
    # (serve_app/model/quant/precision.py)
    prec = precision(resolve_dtype(config.dtype, device), device, quantization(config))
    dtype, quant = prec.compute, prec.weights
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    model = load_model(config.model, device, dtype, experts, spec, quant)
    held = held_quantization(spec, quant)  # a pre-quantized checkpoint's own scheme
    fmt = checkpoint_format(spec.hf_config)
    memory = kv_memory(config, device)
    lora = lora_registry(config, spec, model, not experts.is_remote, device, memory)
    block_bytes = kv_block_bytes(spec, config.block_size, prec.kv)  # bf16: half, twice the blocks
    blocks, lora_blocks = num_kv_blocks(config, memory, block_bytes, lora.limits.max_bytes or 0)
    max_model_len = min(
        config.max_model_len or spec.max_position_embeddings, blocks * config.block_size
    )
    runner = ModelRunner(
        model,
        blocks,
        config.block_size,
        device,
        prec.kv,
        config.num_micro_batches if experts.is_remote else 1,
    )
    pinned = set(config.lora_pinned)
    for name, path in config.lora_adapters:
        lora.load(name, path, pinned=name in pinned)
    # KV dtype: what a block holds where it is shared (the connector may compress it); a bf16
    # pool's blocks never share a namespace with a float32 pool's (the codec checks it too)
    kv_dtype = str(prec.kv) if connector is None else connector.kv_dtype(str(prec.kv))
    digest = model_digest(
        config.model,
        dtype=str(dtype),
        block_size=config.block_size,
        kv_dtype=kv_dtype,
        kv_format=spec.kv_format.tag(),  # MHA K/V or MLA latent rows: never mixed
        **({"quantization": held.tag()} if held.enabled else {}),  # float digests unchanged
        **({"checkpoint": fmt.tag()} if fmt is not None else {}),  # pre-quantized: its format
    )
    log.info(
        "engine ready: %s on %s/%s (weights %s, KV %s), %d KV blocks of %d (%d given up to "
        "LoRA adapters: %d bytes), max_model_len %d",
        spec.architecture,
        device,
        dtype,
        held.tag(),
        prec.kv,
        blocks,
        config.block_size,
        lora_blocks,
        lora.limits.max_bytes or 0,
        max_model_len,
    )
    return EngineParts(
        config=config,
        spec=spec,
        tokenizer=tokenizer,
        eos_token_ids=_eos_token_ids(config.model, tokenizer),
        runner=runner,
        num_kv_blocks=blocks,
        lora_kv_blocks=lora_blocks,
        kv_block_bytes=block_bytes,
        kv_dtype=prec.kv,
        max_model_len=max_model_len,
        model_digest=digest,
        connector=None if connector is None else connector(runner, digest),
        expert_token_counts=count_expert_tokens(model, spec.num_experts),
        weight_bytes=weight_bytes(model) + experts.weight_bytes(),
        quantization=held.tag(),
        lora=lora,
    )


def lora_registry(
    config: EngineConfig,
    spec: ModelSpec,
    model: torch.nn.Module,
    experts_in_process: bool,
    device: torch.device,
    pool_memory: float | None,
) -> LoraRegistry:
    """The adapters' registry, its byte budget computed from the model's LoRA targets and the
    KV pool's memory (None: an explicit block count)."""
    shapes, targets = base_shapes(config.model, spec), lora_targets.targets(model)
    largest = max_adapter_bytes(shapes, list(targets), config.max_lora_rank, experts_in_process)
    limits = LoraLimits(
        max_loras=config.max_loras,
        max_bytes=lora_budget_bytes(
            config.max_loras,
            largest,
            config.max_lora_memory_gb,
            serves_adapters=bool(config.lora_adapters),
            kv_memory=pool_memory,
        ),
        max_cpu_loras=config.max_cpu_loras,
    )
    return LoraRegistry(shapes, targets, config.max_lora_rank, experts_in_process, limits, device)


def quantization(config: EngineConfig) -> Quantization:
    """The weight quantization EngineConfig asks for (its fields are checked there)."""
    return Quantization(config.quantization, config.quantization_group_size)


def _eos_token_ids(model_dir: str, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    try:
        gen = GenerationConfig.from_pretrained(model_dir)
        eos = gen.eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    except OSError:
        pass
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
