"""Expert weights from a checkpoint: per MoE layer, the experts a caller owns, stacked.

The in-process executor loads every expert; an expert shard only the ones it owns.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from serve_app.experts.local import ExpertWeights
from serve_app.experts.quantized import QuantExpertWeights
from serve_app.model.config import ModelSpec, load_model_spec
from serve_app.model.loader import expert_key, iter_weights, split_weights
from serve_app.model.quant.checkpoint import held_quantization, read_linears
from serve_app.model.quant.formats import checkpoint_format
from serve_app.model.quant.scheme import (
    NO_QUANT,
    Int4Weight,
    Int8Weight,
    Quantization,
    QuantizationError,
    combine,
)


def load_expert_weights(
    model_dir: str | Path,
    device: torch.device,
    dtype: torch.dtype,
    owned: list[int] | None = None,
    spec: ModelSpec | None = None,
    quant: Quantization = NO_QUANT,
) -> dict[int, ExpertWeights]:
    """The experts in `owned` (None: all), of every MoE layer, read from the checkpoint,
    quantized as `quant` says (a pre-quantized checkpoint's experts: as it has them)."""
    spec = spec or load_model_spec(model_dir)
    held = held_quantization(spec, quant)  # refuses a scheme that conflicts with the checkpoint's
    quant = held if quant.enabled else quant  # float experts of a pre-quantized one: as held
    wanted = None if owned is None else set(owned)

    def keep(name: str) -> bool:
        key = expert_key(spec, name)
        return key is not None and (wanted is None or key[1] is None or key[1] in wanted)

    tensors = read_linears(checkpoint_format(spec.hf_config), dict(iter_weights(model_dir, keep)))
    _, experts = split_weights(spec, iter(tensors.items()))
    return stack_experts(spec, experts, device, dtype, owned, quant)


def stack_experts(
    spec: ModelSpec,
    experts: dict[tuple[int, int | None, str], torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
    owned: list[int] | None = None,
    quant: Quantization = NO_QUANT,
) -> dict[int, ExpertWeights]:
    """Per MoE layer: w13 [E, D, 2I] (gate columns, then up columns) and w2 [E, I, D]: the
    checkpoint's [out, in] matrices transposed once here, then packed for the CPU kernel where it
    applies (see serve_app/experts/local.py). Quantized, they stay [out, in]
    (serve_app/experts/quantized.py); pre-quantized (Int8Weight / Int4Weight), they are
    stacked as they are."""
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
        elif _held(w, layer):
            cat = [combine([w[(e, gate)], w[(e, up)]], torch.cat) for e in ids]
            w13, w2 = combine(cat, torch.stack), combine([w[(e, down)] for e in ids], torch.stack)
            out[layer] = QuantExpertWeights.held(w13, w2, ids, dtype, device)
            continue
        else:
            w13 = torch.stack([torch.cat([w[(e, gate)], w[(e, up)]]) for e in ids])
            w2 = torch.stack([w[(e, down)] for e in ids])
        if quant.enabled:
            out[layer] = QuantExpertWeights.quantize(
                w13.to(device), w2.to(device), ids, quant, dtype, layer
            )
            continue
        out[layer] = ExpertWeights.build(
            _input_major(w13, device, dtype), _input_major(w2, device, dtype), ids
        )
    return out


def _held(w: dict, layer: int) -> bool:
    """Whether a layer's experts are pre-quantized (all of them) or float (all of them)."""
    quantized = [isinstance(t, (Int8Weight, Int4Weight)) for t in w.values()]
    if any(quantized) and not all(quantized):
        raise QuantizationError(f"MoE layer {layer} mixes pre-quantized and float experts")
    return all(quantized)


def _input_major(w: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[E, out, in] -> contiguous [E, in, out] on `device`."""
    return w.to(device, dtype).transpose(1, 2).contiguous()
