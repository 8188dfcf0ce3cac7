"""The PEFT adapter reader against PEFT itself: for adapters that `peft` builds on the tiny
checkpoints (q/v only, every linear, and 3-D expert `target_parameters`), the factors we read
reproduce exactly the weights PEFT's merge_and_unload() gives; per-expert modules, rsLoRA and
rank/alpha patterns; and everything refused is refused with one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from serve_app.lora.peft_format import LoraError, load_adapter, pattern_value
from serve_app.model.loader import base_shapes
from tests.conftest import tiny_model_dir

peft = pytest.importorskip("peft")

TARGETS = {
    "qv": {"target_modules": ["q_proj", "v_proj"]},
    "all": {"target_modules": "all-linear"},
    "experts3d": {
        "target_modules": ["q_proj"],
        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    },
}


def make_peft_adapter(model_dir: Path, out: Path, seed: int = 0, r: int = 4, **kw) -> Path:
    """A random (init_lora_weights=False: not a no-op) PEFT LoRA adapter for model_dir."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False, **kw)
    peft.get_peft_model(base, cfg).save_pretrained(out)
    return out


def merged_deltas(model_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """{parameter name: merged - base} from PEFT's own merge."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    merged = peft.PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    return {
        n: p.detach() - before[n]
        for n, p in merged.named_parameters()
        if not torch.equal(p.detach(), before[n])
    }


@pytest.mark.parametrize(
    "arch,kind",
    [("qwen3_moe", "qv"), ("deepseek_v3", "all"), ("qwen3_moe", "experts3d"),
     ("mixtral", "experts3d"), ("mixtral", "all")],
)  # fmt: skip
def test_factors_reproduce_peft_merge(arch, kind, tmp_path):
    model_dir = tiny_model_dir(arch)
    adapter_dir = make_peft_adapter(model_dir, tmp_path / "a", **TARGETS[kind])
    adapter = load_adapter("a", adapter_dir, base_shapes(model_dir), max_rank=64)
    deltas = merged_deltas(model_dir, adapter_dir)
    # ours are under the checkpoint's names; transformers 5 calls Mixtral's MoE block `mlp`
    ours: dict[str, torch.Tensor] = {f"{m}.weight": w.b @ w.a for m, w in adapter.linears.items()}
    for (layer, proj), w in adapter.experts.items():
        ours[f"model.layers.{layer}.mlp.experts.{proj}_proj"] = torch.bmm(w.b, w.a)
    ours = {n.replace(".block_sparse_moe.", ".mlp."): d for n, d in ours.items()}
    assert set(ours) == set(deltas)
    for name, delta in deltas.items():
        torch.testing.assert_close(ours[name], delta, rtol=1e-5, atol=1e-6, msg=name)
    if kind == "experts3d":
        assert {p for _, p in adapter.experts} == {"gate_up", "down"}
    # PEFT's all-linear gives the experts' gate_up_proj rank 2r (its rank_pattern)
    assert adapter.rank == (8 if kind == "all" else 4) and adapter.nbytes > 0


def test_the_digest_follows_the_weights_not_the_name(tmp_path):
    model_dir = tiny_model_dir("qwen3_moe")
    shapes = base_shapes(model_dir)
    a = make_peft_adapter(model_dir, tmp_path / "a", seed=1, **TARGETS["qv"])
    b = make_peft_adapter(model_dir, tmp_path / "b", seed=2, **TARGETS["qv"])
    da = load_adapter("x", a, shapes, 64).digest
    assert load_adapter("y", a, shapes, 64).digest == da
    assert load_adapter("x", b, shapes, 64).digest != da


def _write(dirpath: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    dirpath.mkdir(parents=True, exist_ok=True)
    base_cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    (dirpath / "adapter_config.json").write_text(json.dumps({**base_cfg, **cfg}))
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, dirpath / "adapter_model.safetensors")
    return dirpath


def _qproj(r: int = 2, out: int = 64, inp: int = 64, layer: int = 0) -> dict[str, torch.Tensor]:
    key = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
    a, b = torch.randn(r, inp), torch.randn(out, r)
    return {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}


def test_rslora_and_patterns_scale_per_module(tmp_path):
    shapes = base_shapes(tiny_model_dir("qwen3_moe"))
    t = {**_qproj(layer=0), **_qproj(r=4, layer=1)}
    cfg = {"rank_pattern": {"layers.1.self_attn.q_proj": 4}, "alpha_pattern": {"q_proj": 6}}
    adapter = load_adapter("p", _write(tmp_path / "p", cfg, t), shapes, 64)
    for layer, r in ((0, 2), (1, 4)):
        key = f"model.layers.{layer}.self_attn.q_proj"
        b = t[f"base_model.model.{key}.lora_B.weight"]
        torch.testing.assert_close(adapter.linears[key].b, b * 6 / r)
    q = _qproj()
    rs = load_adapter("rs", _write(tmp_path / "rs", {"use_rslora": True}, q), shapes, 64)
    key = "model.layers.0.self_attn.q_proj"
    b = q[f"base_model.model.{key}.lora_B.weight"]
    torch.testing.assert_close(rs.linears[key].b, b * 4 / math.sqrt(2))  # alpha / sqrt(r)
    assert pattern_value({"q_proj": 8}, "model.layers.0.self_attn.q_proj", 1) == 8
    assert pattern_value({"q_proj": 8}, "model.layers.0.self_attn.xq_proj", 1) == 1


def test_per_expert_modules_stack_into_the_fused_layout(tmp_path):
    model_dir = tiny_model_dir("qwen3_moe")
    shapes = base_shapes(model_dir)
    e, inter, hidden = shapes.experts[0]
    t: dict[str, torch.Tensor] = {}
    want_gate_up, want_down = torch.zeros(e, 2 * inter, hidden), torch.zeros(e, hidden, inter)
    for expert in (1, 5):
        p = f"base_model.model.model.layers.0.mlp.experts.{expert}"
        for proj, (o, i) in {"gate_proj": (inter, hidden), "up_proj": (inter, hidden),
                             "down_proj": (hidden, inter)}.items():  # fmt: skip
            a, b = torch.randn(2, i), torch.randn(o, 2)
            t[f"{p}.{proj}.lora_A.weight"], t[f"{p}.{proj}.lora_B.weight"] = a, b
            d = 2.0 * b @ a  # alpha 4 / r 2
            if proj == "down_proj":
                want_down[expert] = d
            else:
                half = 0 if proj == "gate_proj" else 1
                want_gate_up[expert, half * inter : (half + 1) * inter] = d
    adapter = load_adapter("pe", _write(tmp_path / "pe", {}, t), shapes, 64)
    gu, dn = adapter.experts[(0, "gate_up")], adapter.experts[(0, "down")]
    assert gu.a.shape == (e, 4, hidden) and adapter.rank == 4
    torch.testing.assert_close(torch.bmm(gu.b, gu.a), want_gate_up)
    torch.testing.assert_close(torch.bmm(dn.b, dn.a), want_down)


@pytest.mark.parametrize(
    "cfg,tensors,message",
    [
        ({"use_dora": True}, None, "use_dora=True is not supported"),
        ({"modules_to_save": ["lm_head"]}, None, "modules_to_save"),
        ({"bias": "all"}, None, "bias='all' is not supported"),
        ({"peft_type": "IA3"}, None, "peft_type IA3 is not LORA"),
        ({}, _qproj(r=80), "rank 80 is above the maximum 64"),
        ({}, _qproj(out=32), "is 32x64 (out x in), the base model's is 64x64"),
        (
            {},
            {
                "base_model.model.model.layers.0.self_attn.zz_proj.lora_A.weight": torch.ones(2, 4),
                "base_model.model.model.layers.0.self_attn.zz_proj.lora_B.weight": torch.ones(4, 2),
            },
            "the base model has no linear model.layers.0.self_attn.zz_proj",
        ),  # fmt: skip
        (
            {},
            {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 64)},
            "lora_A or lora_B missing",
        ),
        (
            {},
            {"base_model.model.model.embed_tokens.lora_embedding_A": torch.ones(2, 64)},
            "is not a LoRA A/B weight",
        ),
    ],
)
def test_what_cannot_be_served_is_one_line(cfg, tensors, message, tmp_path):
    shapes = base_shapes(tiny_model_dir("qwen3_moe"))
    d = _write(tmp_path / "bad", cfg, tensors if tensors is not None else _qproj())
    with pytest.raises(LoraError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        load_adapter("bad", d, shapes, max_rank=64)
    assert "\n" not in str(e.value)


def test_missing_files_and_pickles_are_refused(tmp_path):
    shapes = base_shapes(tiny_model_dir("qwen3_moe"))
    with pytest.raises(LoraError, match="is not a directory"):
        load_adapter("x", tmp_path / "nope", shapes, 64)
    d = tmp_path / "bin"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    (d / "adapter_model.bin").write_bytes(b"\x80\x04not read")
    with pytest.raises(LoraError, match="adapter_model.bin is pickle: not loaded"):
        load_adapter("x", d, shapes, 64)
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(LoraError, match="not valid JSON"):
        load_adapter("x", d, shapes, 64)
