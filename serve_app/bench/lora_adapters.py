"""Random PEFT LoRA adapters for a base checkpoint, for the benchmarks that need many of them
(`bench lora`, `bench routing --adapters`).

Written in PEFT's own layout (adapter_config.json + adapter_model.safetensors, the keys
serve_app/lora/peft_format.py reads, which tests/lora checks against adapters PEFT itself
saved) from the base checkpoint's safetensors headers: no peft, no weights loaded, so 200 of
them take seconds. Random and non-zero (B too), so each one changes the output as a trained
one would; seeded, so a rerun writes the same files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from serve_app.model.loader import base_shapes

TARGETS = ("q_proj", "v_proj")
WEIGHTS = "adapter_model.safetensors"


def write_random_adapters(
    model_dir: str | Path,
    out_dir: str | Path,
    names: list[str],
    rank: int = 8,
    seed: int = 0,
    targets: tuple[str, ...] = TARGETS,
) -> dict[str, str]:
    """One adapter directory per name under out_dir; returns name -> directory."""
    shapes = base_shapes(model_dir).linears
    modules = sorted(m for m in shapes if m.rsplit(".", 1)[-1] in targets)
    if not modules:
        raise ValueError(f"{model_dir}: no {' / '.join(targets)} linear to put LoRA on")
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
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
        config = {
            "peft_type": "LORA",
            "r": rank,
            "lora_alpha": 2 * rank,
            "target_modules": list(targets),
            "base_model_name_or_path": str(model_dir),
        }
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / WEIGHTS))
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)  # whole or absent: an interrupted write is redone
        out[name] = str(path)
    return out


def adapter_dirs(
    model_dir: str, root: Path, count: int, rank: int, targets: list[str]
) -> list[str]:
    """`count` adapter directories for model_dir under root, written where missing (kept
    between runs: the same seeds give the same files)."""
    root = root / f"{Path(model_dir).resolve().name}-r{rank}-{'-'.join(targets)}"
    names = [f"a{i:03d}" for i in range(count)]
    for i, name in enumerate(names):
        if not (root / name / WEIGHTS).exists():
            write_random_adapters(model_dir, root, [name], rank, seed=i, targets=tuple(targets))
    return [str(root / n) for n in names]
