"""Load an HF checkpoint directory (config.json + *.safetensors) into a CausalLM.

Dense weights load by name. Expert weights (per-expert `experts.N.gate_proj` / `w1` tensors, or
the fused `experts.gate_up_proj` layout of newer transformers) are stacked per layer into
ExpertWeights and handed to an ExpertExecutor, so a caller can keep only the experts it owns.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from serve_app.experts.base import ExpertExecutor
from serve_app.experts.local import ExpertWeights, LocalExperts
from serve_app.model.config import ModelSpec, load_model_spec
from serve_app.model.decoder import CausalLM
from serve_app.model.layers.rotary import rope_frequencies

_EXPERT_RE = re.compile(r"model\.layers\.(\d+)\.(\w+)\.experts\.(?:(\d+)\.)?(\w+?)(?:\.weight)?$")


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
    spec: ModelSpec | None = None,
    experts: ExpertExecutor | None = None,
) -> CausalLM:
    """Build the model on `device`. Experts are held in-process (LocalExperts) unless an
    executor is given (remote expert shards): then expert weights are not even read."""
    spec = spec or load_model_spec(model_dir)
    with torch.device("meta"):
        model = CausalLM(spec)
    model.to_empty(device=device)
    keep = None if experts is None else (lambda name: not _is_expert(spec, name))
    dense, expert_tensors = split_weights(spec, iter_weights(model_dir, keep))
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
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(dense[name].to(dtype))
    model.to(dtype)
    _reset_buffers(model, spec, device)
    if experts is None:
        experts = LocalExperts(stack_experts(spec, expert_tensors, device, dtype))
    for block in model.moe_blocks():
        block.experts = experts
    return model.eval()


def load_expert_shard(
    model_dir: str | Path,
    owned: list[int],
    device: torch.device,
    dtype: torch.dtype,
    spec: ModelSpec | None = None,
) -> dict[int, ExpertWeights]:
    """Only the experts in `owned`, of every MoE layer (what one expert shard holds)."""
    spec = spec or load_model_spec(model_dir)
    wanted = set(owned)

    def keep(name: str) -> bool:
        m = _EXPERT_RE.match(name)
        return bool(m) and (m.group(3) is None or int(m.group(3)) in wanted)

    _, experts = split_weights(spec, iter_weights(model_dir, keep))
    return stack_experts(spec, experts, device, dtype, owned)


def _is_expert(spec: ModelSpec, name: str) -> bool:
    return spec.is_moe and _EXPERT_RE.match(name) is not None


def split_weights(spec: ModelSpec, weights: Iterator[tuple[str, torch.Tensor]]):
    """Separate dense tensors from expert tensors: ({name: t}, {(layer, expert|None, proj): t})."""
    dense: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, int | None, str], torch.Tensor] = {}
    for name, t in weights:
        m = _EXPERT_RE.match(name)
        if m and spec.is_moe:
            layer, _, expert, proj = m.groups()
            experts[(int(layer), None if expert is None else int(expert), proj)] = t
        else:
            dense[name] = t
    return dense, experts


def stack_experts(
    spec: ModelSpec,
    experts: dict[tuple[int, int | None, str], torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
    owned: list[int] | None = None,
) -> dict[int, ExpertWeights]:
    """Per MoE layer: w13 [E, D, 2I] (gate columns, then up columns) and w2 [E, I, D]: the
    checkpoint's [out, in] matrices transposed once here, then packed for the CPU kernel where it
    applies (see serve_app/experts/local.py)."""
    gate, up, down = spec.traits.expert_names
    ids = list(range(spec.num_experts)) if owned is None else sorted(owned)
    by_layer: dict[int, dict] = defaultdict(dict)
    for (layer, expert, proj), t in experts.items():
        by_layer[layer][(expert, proj)] = t
    out = {}
    for layer, is_moe in enumerate(spec.moe_layers):
        if not is_moe:
            continue
        w = by_layer.get(layer)
        if not w:
            raise ValueError(f"no expert weights for MoE layer {layer}")
        if (None, "gate_up_proj") in w:  # fused layout
            w13 = w[(None, "gate_up_proj")][ids]
            w2 = w[(None, "down_proj")][ids]
        else:
            w13 = torch.stack([torch.cat([w[(e, gate)], w[(e, up)]]) for e in ids])
            w2 = torch.stack([w[(e, down)] for e in ids])
        out[layer] = ExpertWeights.build(
            _input_major(w13, device, dtype), _input_major(w2, device, dtype), ids
        )
    return out


def _input_major(w: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[E, out, in] -> contiguous [E, in, out] on `device`."""
    return w.to(device, dtype).transpose(1, 2).contiguous()


def _reset_buffers(model: CausalLM, spec: ModelSpec, device: torch.device) -> None:
    """to_empty() leaves buffers uninitialised: rebuild them."""
    inv_freq, scaling = rope_frequencies(spec.hf_config, spec.head_dim)
    model.model.rotary.inv_freq = inv_freq.to(device)
    model.model.rotary.scaling = scaling
