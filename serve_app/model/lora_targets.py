"""Which modules of a loaded model apply LoRA deltas, under their checkpoint names.

`tag(model)` runs once at load, after every module replacement (quantized linears): it names
each target (`module.lora_name`), which is how `project()` and the MoE gate find an adapter's
factors for it. `targets(model)` lists them with the row order their weight was loaded in
(MLA permutes the rope rows of q_b_proj / q_proj and kv_a_proj_with_mqa at load, so an
adapter's B rows must be permuted alike). MLA's `kv_b_proj` is a target too: its delta is
applied in the absorbed form by MLAttention (serve_app/model/layers/mla.py), as a linear in
the expanded one.
"""

from __future__ import annotations

import torch
from torch import nn


def tag(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if not name.startswith("model.layers."):
            continue
        w = getattr(m, "weight", None)
        gate_like = isinstance(w, torch.Tensor) and w.dim() == 2  # the MoE gate
        if gate_like or hasattr(m, "in_features"):  # quantized linears hold no `weight`
            m.lora_name = name


def targets(model: nn.Module) -> dict[str, torch.Tensor | None]:
    orders: dict[str, torch.Tensor] = {}
    for name, m in model.named_modules():
        row_orders = getattr(m, "lora_row_orders", None)
        if row_orders is not None:
            orders.update({f"{name}.{child}": order for child, order in row_orders().items()})
    return {
        m.lora_name: orders.get(m.lora_name)
        for m in model.modules()
        if getattr(m, "lora_name", None) is not None
    }
