"""Load an HF checkpoint directory (config.json + *.safetensors) into a CausalLM.

Dense weights load by name; layers past num_hidden_layers (DeepSeek-V3's multi-token-prediction
layers) are not read. Expert weights (per-expert `experts.N.gate_proj` / `w1` tensors, or
the fused `experts.gate_up_proj` layout of newer transformers) are left to the ExpertExecutor:
split_weights names them here, serve_app/experts/weights.py stacks the ones a caller owns.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from serve_app.lora.peft_format import BaseShapes
from serve_app.model import lora_targets
from serve_app.model.config import ModelSpec, load_model_spec
from serve_app.model.decoder import CausalLM
from serve_app.model.expert_executor import ExpertExecutor
from serve_app.model.layers.rotary import rope_frequencies
from serve_app.model.quant.checkpoint import (
    held_quantization,
    hold_linears,
    read_linears,
    split_held,
)
from serve_app.model.quant.formats import checkpoint_format
from serve_app.model.quant.linear import quantize_linears
from serve_app.model.quant.methods import BF16, quantizes
from serve_app.model.quant.scheme import NO_QUANT, Quantization

# the projection, then `.weight` or a pre-quantized format's tensor (`.qweight`, `.scales`, ...)
_EXPERT_RE = re.compile(r"model\.layers\.(\d+)\.(\w+)\.experts\.(?:(\d+)\.)?(\w+?)(?:\.\w+)?$")
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.")


def weight_files(model_dir: str | Path) -> list[Path]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    return files


def iter_weights(
    model_dir: str | Path, keep: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every weight, or of those `keep` accepts (the others are not read)."""
    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if keep is None or keep(name):
                    yield name, f.get_tensor(name)


def load_model(
    model_dir: str | Path,
    device: torch.device,
    dtype: torch.dtype,
    experts: ExpertExecutor,
    spec: ModelSpec | None = None,
    quant: Quantization = NO_QUANT,
) -> CausalLM:
    """Build the model on `device` with its dense weights; the MoE blocks call `experts`
    (in-process or remote: serve_app/experts/weights.py loads their weights), so expert
    tensors are not even read here. With `quant`, the decoder layers' linears are quantized
    once loaded (serve_app/model/quant/linear.py); the gates, norms, embeddings and LM head
    stay float. A pre-quantized checkpoint's linears are held as it has them
    (serve_app/model/quant/checkpoint.py), and `quant` applies to its float ones."""
    spec = spec or load_model_spec(model_dir)
    # a scheme that conflicts with a pre-quantized checkpoint's is refused; asked, its float
    # linears take the checkpoint's (group included), under none they stay float
    held = held_quantization(spec, quant)
    quant = held if quant.enabled else quant
    with torch.device("meta"):
        model = CausalLM(spec)
    model.to_empty(device=device)
    fmt = checkpoint_format(spec.hf_config)
    raw = dict(iter_weights(model_dir, lambda name: _is_dense(spec, name)))
    dense, prequantized = split_held(read_linears(fmt, raw))
    if spec.tie_word_embeddings or "lm_head.weight" not in dense:
        dense["lm_head.weight"] = dense["model.embed_tokens.weight"]
    params = dict(model.named_parameters())
    missing = set(params) - set(dense)
    unexpected = set(dense) - set(params)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match {spec.architecture}: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.to(dtype)
    for module in model.modules():
        if getattr(module, "keep_fp32", False):  # DeepSeek's gate and its correction bias
            module.float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(dense[name].to(p.dtype))
    for module in model.modules():
        if hasattr(module, "after_load"):  # MLA: rope row order, absorbed W_UK / W_UV
            module.after_load()
    hold_linears(model, prequantized, dtype)  # after after_load: it shows the row order
    quantize_linears(model, quant)  # after MLA's row permutation: per-row schemes commute
    if quant.method == BF16:  # the table's values as bf16 holds them (a float32 gather still)
        emb = model.model.embed_tokens.weight
        emb.data = emb.data.to(torch.bfloat16).float()
    lora_targets.tag(model)  # after every module replacement
    _reset_buffers(model, spec, device)
    for block in model.moe_blocks():
        block.experts = experts
    return model.eval()


def check_quantization(model_dir: str | Path, quant: Quantization) -> None:
    """Refuse before anything is loaded a checkpoint that `quant` cannot hold: a
    QuantizationError naming its first such matrix (int4: K no allowed group divides). Reads
    the safetensors headers only. A pre-quantized checkpoint: its format's settings, and a
    configured scheme that conflicts with its own, are refused here too."""
    spec = load_model_spec(model_dir)
    held_quantization(spec, quant)
    if quant.method != "int4":
        return
    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if quantizes(name) and not beyond_layers(spec, name):
                    quant.group_for(f.get_slice(name).get_shape()[-1], name)


def expert_key(spec: ModelSpec, name: str) -> tuple[int, int | None, str] | None:
    """(layer, expert | None for the fused layout, projection) of an expert tensor, else None."""
    m = _EXPERT_RE.match(name) if spec.is_moe else None
    if m is None or int(m.group(1)) >= spec.num_layers:
        return None
    layer, _, expert, proj = m.groups()
    return int(layer), None if expert is None else int(expert), proj


def _is_expert(spec: ModelSpec, name: str) -> bool:
    return expert_key(spec, name) is not None


def beyond_layers(spec: ModelSpec, name: str) -> bool:
    """A tensor of a layer past num_hidden_layers (DeepSeek-V3's MTP layers): never served."""
    m = _LAYER_RE.match(name)
    return m is not None and int(m.group(1)) >= spec.num_layers


def _is_dense(spec: ModelSpec, name: str) -> bool:
    return not _is_expert(spec, name) and not beyond_layers(spec, name)


def split_weights(spec: ModelSpec, weights: Iterator[tuple[str, torch.Tensor]]):
    """Separate dense tensors from expert tensors: ({name: t}, {(layer, expert|None, proj): t}).
    Expert tensors are the projection's `weight` (or the fused tensor itself): a pre-quantized
    format's tensors are gathered into one `weight` first (quant/checkpoint.py read_linears)."""
    dense: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, int | None, str], torch.Tensor] = {}
    for name, t in weights:
        key = expert_key(spec, name)
        if key is None:
            dense[name] = t
        elif name.endswith((f".{key[2]}", f".{key[2]}.weight")):
            experts[key] = t
        else:  # NOTE: it would overwrite the projection's weight under the same key
            raise ValueError(f"unexpected expert tensor {name}")
    return dense, experts


def _reset_buffers(model: CausalLM, spec: ModelSpec, device: torch.device) -> None:
    """to_empty() leaves buffers uninitialised: rebuild them."""
    inv_freq, scaling = rope_frequencies(spec.hf_config, spec.rotary_dim)
    model.model.rotary.inv_freq = inv_freq.to(device)
    model.model.rotary.scaling = scaling


def base_shapes(model_dir: str | Path, spec: ModelSpec | None = None) -> BaseShapes:
    """What a LoRA adapter is checked against (serve_app/lora/peft_format.py): the float
    linears of the checkpoint by module name (from its safetensors headers; a pre-quantized
    linear's [N, K] from its format's tensors, CheckpointFormat.shape) and each MoE layer's
    routed experts."""
    spec = spec or load_model_spec(model_dir)
    fmt = checkpoint_format(spec.hf_config)
    marker = None if fmt is None else "." + fmt.marker
    linears: dict[str, tuple[int, int]] = {}
    for file in weight_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            names = set(f.keys())
            for name in names:
                if expert_key(spec, name) is not None:
                    continue
                if name.endswith(".weight"):
                    shape = tuple(f.get_slice(name).get_shape())
                    if len(shape) == 2:
                        linears[name.removesuffix(".weight")] = (shape[0], shape[1])
                elif marker is not None and name.endswith(marker):  # a pre-quantized linear
                    prefix = name.removesuffix(marker)
                    shapes = {
                        s: tuple(f.get_slice(f"{prefix}.{s}").get_shape())
                        for s in fmt.suffixes
                        if f"{prefix}.{s}" in names
                    }
                    read = lambda s, p=prefix, f=f: f.get_tensor(f"{p}.{s}")  # noqa: E731
                    linears[prefix] = fmt.shape(shapes, read)
    experts = {
        layer: (spec.num_experts, spec.moe_intermediate_size, spec.hidden_size)
        for layer, moe in enumerate(spec.moe_layers)
        if moe
    }
    return BaseShapes(linears, experts, spec.traits.moe_module)
