"""Random PEFT LoRA adapters for `moeserve bench lora`, written once and reused.

PEFT builds one adapter on the model (`init_lora_weights=False`, so it is not a no-op); the
others are its copies with new random factors of the same shapes and scale, seeded by their
index. Building 200 PeftModels would take minutes of the benchmark's budget for nothing the
engine can tell apart: it reads each directory's config and tensors, and each one's digest
differs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def adapter_dirs(
    model_dir: str, root: Path, count: int, rank: int, targets: list[str]
) -> list[str]:
    """`count` adapter directories for model_dir under root (made where missing)."""
    root = root / f"{Path(model_dir).resolve().name}-r{rank}-{'-'.join(targets)}"
    template = root / "a000"
    if not (template / WEIGHTS).exists():
        _peft_adapter(model_dir, template, rank, targets)
    dirs = [template]
    for i in range(1, count):
        d = root / f"a{i:03d}"
        if not (d / WEIGHTS).exists():
            _variant(template, d, seed=i)
        dirs.append(d)
    return [str(d) for d in dirs]


def _peft_adapter(model_dir: str, out: Path, rank: int, targets: list[str]) -> None:
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = peft.LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False
    )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    peft.get_peft_model(base, cfg).save_pretrained(tmp)
    tmp.rename(out)  # whole or absent: an interrupted build is redone


def _variant(template: Path, out: Path, seed: int) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {
        name: torch.randn(t.shape, generator=gen) * t.std()
        for name, t in load_file(template / WEIGHTS).items()
    }
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, exist_ok=True)
    shutil.copy(template / CONFIG, tmp / CONFIG)
    save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
    tmp.rename(out)
