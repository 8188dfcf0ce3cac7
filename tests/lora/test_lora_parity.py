"""Serving PEFT adapters in-process against transformers running PEFT's merged model: greedy
tokens identical and log-probabilities close, for q/v-only adapters, every-linear adapters
(attention, dense and shared-expert MLPs, MoE gates, per-expert routed experts) and 3-D expert
`target_parameters`, on each tiny architecture; a batch mixing the base model and adapters
gives every request the tokens it gets alone; and the prefix cache never mixes them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from serve_app.engine.errors import InvalidRequestError
from serve_app.engine.request import SamplingParams
from serve_app.runtime.llm import LLM
from tests.conftest import tiny_model_dir
from tests.lora.test_peft_format import make_peft_adapter
from tests.model.test_parity import PROMPTS, TOP, assert_matches, hf_reference

peft = pytest.importorskip("peft")

LORA_PROMPTS = PROMPTS[2:4]  # a shared prefix: the second hits the first's blocks
LORA_NEW = 12
EXPERTS_3D = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
CASES = {
    # arch: adapter kinds (LoraConfig kwargs)
    "llama": {"qv": {"target_modules": ["q_proj", "v_proj"]}},
    "qwen3_moe": {
        "all": {"target_modules": "all-linear"},
        "experts3d": {"target_modules": ["q_proj", "v_proj"], "target_parameters": EXPERTS_3D},
    },
    "qwen2_moe": {"all": {"target_modules": "all-linear"}},
    "mixtral": {"experts3d": {"target_modules": ["o_proj"], "target_parameters": EXPERTS_3D}},
    "deepseek_v3": {"all": {"target_modules": "all-linear"}},
    "deepseek_v2": {"qv": {"target_modules": ["q_proj", "kv_a_proj_with_mqa"]}},
}


def merged_checkpoint(model_dir: Path, adapter_dir: Path, out: Path) -> Path:
    """transformers + PEFT's merge_and_unload(), saved: the reference model."""
    from transformers import AutoModelForCausalLM

    if not (out / "config.json").exists():
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        merged = peft.PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
        merged.save_pretrained(out)
    return out


def check_adapters_alone_and_mixed(llm: LLM, model_dir: Path, adapters: dict, tmp_path) -> None:
    """Each adapter alone gives transformers' greedy tokens on PEFT's merged model (and is not
    a no-op); one batch of the base model and every adapter, each prompt under each, gives each
    request its tokens alone."""
    params = SamplingParams(temperature=0, max_tokens=LORA_NEW, ignore_eos=True, logprobs=TOP)
    base_refs = hf_reference(model_dir, llm.tokenizer, LORA_PROMPTS, LORA_NEW)
    alone = {}
    for kind, adapter_dir in adapters.items():
        ref_dir = merged_checkpoint(model_dir, adapter_dir, tmp_path / f"merged-{kind}")
        refs = hf_reference(ref_dir, llm.tokenizer, LORA_PROMPTS, LORA_NEW)
        assert [r[0] for r in refs] != [r[0] for r in base_refs], "the adapter is a no-op"
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


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(CASES))
def test_adapters_match_peft_merged_transformers(arch, tmp_path):
    model_dir = tiny_model_dir(arch)
    adapters = {
        kind: make_peft_adapter(model_dir, tmp_path / kind, seed=i + 1, **kw)
        for i, (kind, kw) in enumerate(CASES[arch].items())
    }
    llm = LLM(
        str(model_dir), block_size=16, num_kv_blocks=256, max_num_batched_tokens=64,
        lora_adapters=tuple((k, str(d)) for k, d in adapters.items()),
    )  # fmt: skip
    check_adapters_alone_and_mixed(llm, model_dir, adapters, tmp_path)


def test_reloading_an_adapter_never_reuses_its_old_kv(tmp_path):
    model_dir = tiny_model_dir("qwen3_moe")
    first = make_peft_adapter(
        model_dir, tmp_path / "v1", seed=1, target_modules=["q_proj", "v_proj"]
    )
    second = make_peft_adapter(
        model_dir, tmp_path / "v2", seed=2, target_modules=["k_proj", "v_proj"]
    )
    llm = LLM(str(model_dir), block_size=16, num_kv_blocks=128, lora_adapters=(("a", str(first)),))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    prompt = [PROMPTS[4]]
    base = llm.generate(prompt, params)[0]
    hit_before = llm.engine.stats().prefix_hit_tokens
    with_a = llm.generate(prompt, params, lora="a")[0]
    # the base model's blocks of the same prompt are not the adapter's: no hit
    assert llm.engine.stats().prefix_hit_tokens == hit_before
    again = llm.generate(prompt, params, lora="a")[0]
    assert llm.engine.stats().prefix_hit_tokens > hit_before  # its own blocks are
    assert again.choices[0].token_ids == with_a.choices[0].token_ids
    hit = llm.engine.stats().prefix_hit_tokens
    llm.engine.lora.load("a", second)  # same name, new weights
    reloaded = llm.generate(prompt, params, lora="a")[0]
    assert llm.engine.stats().prefix_hit_tokens == hit  # nothing of v1's KV is reused
    fresh = LLM(
        str(model_dir), block_size=16, num_kv_blocks=128, lora_adapters=(("a", str(second)),)
    )
    assert (
        reloaded.choices[0].token_ids
        == fresh.generate(prompt, params, lora="a")[0].choices[0].token_ids
    )
    assert base.choices[0].token_ids != with_a.choices[0].token_ids


def test_an_unknown_adapter_is_a_request_error(tmp_path):
    llm = LLM(str(tiny_model_dir("qwen3_moe")), block_size=16, num_kv_blocks=64)
    with pytest.raises(InvalidRequestError, match="LoRA adapter 'nope' is not loaded"):
        llm.generate(["hi"], SamplingParams(max_tokens=2), lora="nope")
    assert not llm.engine.has_unfinished_requests()
