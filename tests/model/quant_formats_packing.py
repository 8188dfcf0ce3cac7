"""Pre-quantized checkpoints written by the formats' own packing rules, for the tests.

Packers follow AutoGPTQ's `pack` (qweight along K, qzeros along N, zero - 1 stored in the v1
format), AutoAWQ's WQLinear_GEMM (order_map [0, 2, 4, 6, 1, 3, 5, 7]), compressed-tensors'
`pack_to_int32` (q + 2^(bits - 1), lowest bits first) and DeepSeek's FP8 block scales; they
are written from those rules, not from the loader. `prequantized` writes a tiny checkpoint in
a format and the float checkpoint of its weights as we hold them (the reference).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from serve_app.model.loader import iter_weights
from serve_app.model.quant.formats import checkpoint_format
from serve_app.model.quant.formats.awq import AWQ_ORDER
from serve_app.model.quant.methods import quantizes
from tests.conftest import tiny_model_dir

G = 32  # the tiny presets' K are 32, 64 and 128


def pack_int32(vals: torch.Tensor, bits: int, order=None) -> torch.Tensor:
    """[..., M] unsigned values -> [..., M * bits / 32] int32, value j of each run of 32 / bits
    at bits * j (or at the position order.index(j))."""
    per = 32 // bits
    v = vals.long().reshape(*vals.shape[:-1], -1, per)
    if order is not None:
        v = v[..., list(order)]  # word position i holds element order[i]
    word = (v << (torch.arange(per) * bits)).sum(-1)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def rtn_int4(w: torch.Tensor, group: int = G):
    """GPTQ / AWQ's round-to-nearest asymmetric int4 of a float [N, K]: q, z [N, K / G], s fp16."""
    n, k = w.shape
    wg = w.float().reshape(n, k // group, group)
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    s = ((hi - lo) / 15).clamp(min=1e-4).half()
    z = torch.round(-lo / s.float()).clamp(0, 15)
    q = torch.round(wg / s.float()[..., None] + z[..., None]).clamp(0, 15)
    return q.reshape(n, k).to(torch.uint8), z.to(torch.uint8), s


def ours_int4(q, z, s, group: int = G) -> torch.Tensor:
    """The weight as we hold it: (q - 8) * s + (8 - z) * s, in fp32 (the reference)."""
    n, k = q.shape
    s = s.float()
    zero = (8 - z.float()) * s
    w = (q.float().reshape(n, k // group, group) - 8) * s[..., None] + zero[..., None]
    return w.reshape(n, k)


def gptq_tensors(q, z, s, v1: bool = True) -> dict[str, torch.Tensor]:
    k = q.shape[1]
    return {
        "qweight": pack_int32(q, 4).t().contiguous(),  # [K / 8, N]: 8 values of K a word
        "qzeros": pack_int32(z.t().long() - (1 if v1 else 0), 4),
        "scales": s.t().contiguous(),
        "g_idx": (torch.arange(k) // G).int(),
    }


def awq_tensors(q, z, s) -> dict[str, torch.Tensor]:
    return {
        "qweight": pack_int32(q.t().contiguous(), 4, AWQ_ORDER),  # [K, N / 8]
        "qzeros": pack_int32(z.t().contiguous(), 4, AWQ_ORDER),  # [K / G, N / 8]
        "scales": s.t().contiguous(),
    }


def ct_int4_tensors(q_signed: torch.Tensor, s: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "weight_packed": pack_int32(q_signed.long() + 8, 4),  # [N, K / 8]
        "weight_scale": s,
        "weight_shape": torch.tensor(list(q_signed.shape)),
    }


GPTQ_CONFIG = {"quant_method": "gptq", "bits": 4, "group_size": G, "sym": False, "desc_act": False}
AWQ_CONFIG = {
    "quant_method": "awq",
    "bits": 4,
    "group_size": G,
    "zero_point": True,
    "version": "gemm",
}


def ct_config(
    fmt: str, bits: int, strategy: str, group: int | None = None, symmetric: bool = True
) -> dict:
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": strategy,
               "group_size": group}  # fmt: skip
    return {"quant_method": "compressed-tensors", "format": fmt,
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}  # fmt: skip


FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [32, 32],
              "activation_scheme": "dynamic"}  # fmt: skip


def fmt_of(config: dict):
    return checkpoint_format(type("C", (), {"quantization_config": config})())


def _write(out: Path, src: Path, weights: dict, qconfig: dict | None) -> Path:
    out.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    config = json.loads((src / "config.json").read_text())
    if qconfig is not None:
        config["quantization_config"] = qconfig
    (out / "config.json").write_text(json.dumps(config))
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def prequantized(arch: str, kind: str, root: Path) -> tuple[Path, Path]:
    """(a checkpoint of `arch` written as `kind`, the float checkpoint of its weights as we
    hold them: what transformers runs as the reference)."""
    src = tiny_model_dir(arch)
    packed, ref = {}, {}
    for name, t in iter_weights(src):
        ref[name] = t
        if not (quantizes(name) or (kind.startswith("fp8") and name.endswith("kv_b_proj.weight"))):
            packed[name] = t
            continue
        prefix = name.removesuffix(".weight")
        if kind in ("gptq", "awq"):
            q, z, s = rtn_int4(t)
            tensors = gptq_tensors(q, z, s) if kind == "gptq" else awq_tensors(q, z, s)
            ref[name] = ours_int4(q, z, s)
        elif kind == "ct-int4":
            s = (t.abs().reshape(t.shape[0], -1, G).amax(-1) / 7).to(torch.bfloat16)
            sf = s.float().repeat_interleave(G, 1)
            qs = torch.round(t / sf).clamp(-8, 7).to(torch.int8)
            tensors = ct_int4_tensors(qs, s)
            ref[name] = qs.float() * sf  # (u - 8) * s + 0: exact
        elif kind == "ct-int8":
            s = (t.abs().amax(-1, keepdim=True) / 127).half()
            q8 = torch.round(t / s.float()).clamp(-127, 127).to(torch.int8)
            tensors = {"weight": q8, "weight_scale": s}
            ref[name] = q8.float() * s.float()
        else:  # fp8
            n, k = t.shape
            s = torch.rand((n + 31) // 32, (k + 31) // 32) * 0.02 + 0.01
            full = s.repeat_interleave(32, 0)[:n].repeat_interleave(32, 1)[:, :k]
            w8 = (t / full).to(torch.float8_e4m3fn)
            tensors = {"weight": w8, "weight_scale_inv": s}
            ref[name] = w8.float() * full
        packed |= {f"{prefix}.{suffix}": v for suffix, v in tensors.items()}
    config = {"gptq": GPTQ_CONFIG, "awq": AWQ_CONFIG, "fp8": FP8_CONFIG,
              "ct-int4": ct_config("pack-quantized", 4, "group", G),
              "ct-int8": ct_config("int-quantized", 8, "channel")}[kind]  # fmt: skip
    out = root / f"{arch}-{kind}"
    if not (out / "config.json").exists():
        _write(out, src, packed, config)
        _write(root / f"{arch}-{kind}-ref", src, ref, None)
    return out, root / f"{arch}-{kind}-ref"
