"""The parity adapters, shared by the in-process and the 2-shard LoRA parity tests: for each
tiny architecture, the adapter kinds that apply to it (built with `peft`, once per session),
and the check that serves them against transformers + PEFT's merged model.

Which layout each architecture has (transformers 5.25, PEFT 0.22): every MoE architecture we
serve (qwen3_moe, qwen2_moe, mixtral, deepseek_v3, deepseek_v2) holds its routed experts as
3-D parameters (`mlp.experts.gate_up_proj` [E, 2I, D], `mlp.experts.down_proj` [E, D, I]),
fused on load from the checkpoint's per-expert modules. So PEFT reaches the routed experts
only through `target_parameters`: "all-linear" adds them itself (with the MoE gate), and
"experts3d" names them. PEFT cannot build an adapter on per-expert modules here (there are
none to target), so "per_expert" is the "all" adapter rewritten in the layout PEFT wrote on
transformers 4 (`experts.N.gate_proj`, Mixtral's `block_sparse_moe.experts.N.w1`): the same
weights, so PEFT's merged model of "all" is its reference (`REFERENCE_OF`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from serve_app.engine.request import SamplingParams
from serve_app.model.config import load_model_spec
from serve_app.runtime.llm import LLM
from tests.lora.test_peft_format import make_peft_adapter
from tests.model.test_parity import PROMPTS, TOP, assert_matches, hf_reference

peft = pytest.importorskip("peft")

LORA_PROMPTS = PROMPTS[2:4]  # a shared prefix: the second hits the first's blocks
LORA_NEW = 12
EXPERTS_3D = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
GQA_QV = ["q_proj", "v_proj"]
# MLA has no v_proj: its values come out of kv_b_proj (applied in the absorbed and expanded
# forms, mla.py), so q/v there is the query's projections, the compressed-KV projection and
# kv_b_proj
MLA_QV = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"]
MLA_ALL = {"target_modules": "all-linear"}


def _moe(qv: list[str], all_linear: dict) -> dict[str, dict]:
    """An MoE architecture's kinds. "all" covers attention, dense and shared-expert MLPs, the
    MoE gate and the routed experts (3-D, see above); "per_expert" is "all" per expert."""
    return {
        "qv": {"target_modules": qv},
        "all": all_linear,
        "experts3d": {"target_modules": qv[:1], "target_parameters": EXPERTS_3D},
        "per_expert": {},  # not built by peft: per_expert_copy() of "all"
    }


ALL_LINEAR = {"target_modules": "all-linear"}
CASES: dict[str, dict[str, dict]] = {
    # arch: adapter kind -> LoraConfig kwargs
    "llama": {"qv": {"target_modules": GQA_QV}, "all": ALL_LINEAR},  # dense: no experts
    "qwen3_moe": _moe(GQA_QV, ALL_LINEAR),
    "qwen2_moe": _moe(GQA_QV, ALL_LINEAR),  # + the shared expert and its gate
    "mixtral": _moe(GQA_QV, ALL_LINEAR),
    "deepseek_v3": _moe(MLA_QV, MLA_ALL),  # + the dense first layer, the shared experts
    "deepseek_v2": _moe(MLA_QV, MLA_ALL),
}


# kind -> the kind whose PEFT merged model is its reference
REFERENCE_OF = {"per_expert": "all"}


def arch_adapters(arch: str, model_dir: Path, root: Path) -> dict[str, Path]:
    """CASES[arch]'s adapters under root/arch, built once (seeded by their order)."""
    out = {}
    for i, (kind, kw) in enumerate(CASES[arch].items()):
        path = root / arch / kind
        if not (path / "adapter_config.json").exists():
            if kind in REFERENCE_OF:
                per_expert_copy(model_dir, out[REFERENCE_OF[kind]], path)
            else:
                make_peft_adapter(model_dir, path, seed=i + 1, **kw)
        out[kind] = path
    return out


def per_expert_copy(model_dir: Path, adapter_dir: Path, out: Path) -> Path:
    """A PEFT adapter whose routed experts are 3-D `target_parameters` (gate_up_proj and
    down_proj both targeted), rewritten with per-expert modules under the checkpoint's names,
    as PEFT wrote them on transformers 4. Expert e's factors are A.view(E, r, in)[e] and
    B.view(out, r, E)[:, :, e] (PEFT's ParamWrapper); gate and up share gate_up's A_e and
    take B_e's gate and up rows."""
    spec = load_model_spec(model_dir)
    e, inter = spec.num_experts, spec.moe_intermediate_size
    moe, (gate, up, down) = spec.traits.moe_module, spec.traits.expert_names
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    # the nesting: gate_up_proj, registered first, is innermost (experts.base_layer.lora_*)
    fused = re.compile(
        r"^(base_model\.model\.model\.layers\.\d+)\.mlp\.experts\.(base_layer\.)?lora_([AB])\.weight$"
    )
    tensors = {}
    for key, t in load_file(adapter_dir / "adapter_model.safetensors").items():
        m = fused.match(key)
        if m is None:  # transformers 5 calls Mixtral's MoE block `mlp`; its checkpoint does not
            tensors[re.sub(r"(layers\.\d+)\.mlp\.", rf"\1.{moe}.", key)] = t
            continue
        layer, ab = m.group(1), m.group(3)
        projs = (
            [(gate, slice(0, inter)), (up, slice(inter, 2 * inter))]
            if m.group(2)
            else [(down, slice(None))]
        )
        r = t.shape[0 if ab == "A" else 1] // e
        for x in range(e):
            f = t.view(e, r, -1)[x] if ab == "A" else t.view(t.shape[0], r, e)[:, :, x]
            for proj, rows in projs:
                part = f.clone() if ab == "A" else f[rows]
                tensors[f"{layer}.{moe}.experts.{x}.{proj}.lora_{ab}.weight"] = part.contiguous()
    (r_gu,) = {v for k, v in cfg["rank_pattern"].items() if "gate_up_proj" in k} or {cfg["r"]}
    (a_gu,) = {v for k, v in cfg["alpha_pattern"].items() if "gate_up_proj" in k} or {
        cfg["lora_alpha"]
    }
    cfg.update(
        target_modules=[*cfg["target_modules"], "gate", gate, up, down],
        target_parameters=None,
        rank_pattern={rf"experts\.\d+\.({gate}|{up})": r_gu},
        alpha_pattern={rf"experts\.\d+\.({gate}|{up})": a_gu},
    )
    out.mkdir(parents=True)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, out / "adapter_model.safetensors")
    return out


def merged_checkpoint(model_dir: Path, adapter_dir: Path) -> Path:
    """transformers + PEFT's merge_and_unload(), saved next to the adapter (once): the
    reference model."""
    from transformers import AutoModelForCausalLM

    out = adapter_dir.with_name(adapter_dir.name + "-merged")
    if not (out / "config.json").exists():
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        merged = peft.PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
        merged.save_pretrained(out)
    return out


def engine_kwargs(adapters: dict[str, Path]) -> dict:
    return dict(
        block_size=16, num_kv_blocks=256, max_num_batched_tokens=64,
        lora_adapters=tuple((k, str(d)) for k, d in adapters.items()),
    )  # fmt: skip


def check_adapters_alone_and_mixed(llm: LLM, model_dir: Path, adapters: dict[str, Path]) -> None:
    """Each adapter alone gives transformers' greedy tokens on PEFT's merged model (and is not
    a no-op); one batch of the base model and every adapter, each prompt under each, gives each
    request its tokens alone."""
    params = SamplingParams(temperature=0, max_tokens=LORA_NEW, ignore_eos=True, logprobs=TOP)
    base_refs = hf_reference(model_dir, llm.tokenizer, LORA_PROMPTS, LORA_NEW)
    alone = {}
    for kind in adapters:
        ref_dir = merged_checkpoint(model_dir, adapters[REFERENCE_OF.get(kind, kind)])
        refs = hf_reference(ref_dir, llm.tokenizer, LORA_PROMPTS, LORA_NEW)
        assert [r[0] for r in refs] != [r[0] for r in base_refs], f"{kind} is a no-op"
        results = llm.generate(LORA_PROMPTS, params, lora=kind)
        assert_matches(results, refs, LORA_PROMPTS)
        alone[kind] = [r.choices[0].token_ids for r in results]
    names = [None, *adapters]
    prompts = [p for p in LORA_PROMPTS for _ in names]
    mixed = llm.generate(prompts, params, lora=[n for _ in LORA_PROMPTS for n in names])
    for j, res in enumerate(mixed):
        name, i = names[j % len(names)], j // len(names)
        want = base_refs[i][0] if name is None else alone[name][i]
        assert res.choices[0].token_ids == want, (name, LORA_PROMPTS[i])
