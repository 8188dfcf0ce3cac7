"""Random PEFT LoRA adapters for a base checkpoint, for benchmarks that need many of them.

Written in PEFT's own layout (adapter_config.json + adapter_model.safetensors, the keys
serve_app/lora/peft_format.py reads), on the attention q/v projections, from the base
checkpoint's safetensors headers: no peft, no weights loaded. Random and non-zero (B too), so
each one changes the output, as a trained one would; seeded, so a rerun writes the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from serve_app.model.loader import base_shapes

TARGETS = ("q_proj", "v_proj")


def write_random_adapters(
    model_dir: str | Path, out_dir: str | Path, names: list[str], rank: int = 8, seed: int = 0
) -> dict[str, str]:
    """One adapter directory per name under out_dir; returns name -> directory."""
    shapes = base_shapes(model_dir).linears
    modules = sorted(m for m in shapes if m.rsplit(".", 1)[-1] in TARGETS)
    if not modules:
        raise ValueError(f"{model_dir}: no {' / '.join(TARGETS)} linear to put LoRA on")
    out: dict[str, str] = {}
    for i, name in enumerate(names):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
        tensors = {}
        for m in modules:
            n_out, n_in = shapes[m]
            a = torch.randn(rank, n_in, generator=gen) * n_in**-0.5
            b = torch.randn(n_out, rank, generator=gen) * 0.02
            tensors[f"base_model.model.{m}.lora_A.weight"] = a.contiguous()
            tensors[f"base_model.model.{m}.lora_B.weight"] = b.contiguous()
        path = Path(out_dir) / name
        path.mkdir(parents=True, exist_ok=True)
        config = {
            "peft_type": "LORA",
            "r": rank,
            "lora_alpha": 2 * rank,
            "target_modules": list(TARGETS),
            "base_model_name_or_path": str(model_dir),
        }
        (path / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(path / "adapter_model.safetensors"))
        out[name] = str(path)
    return out
