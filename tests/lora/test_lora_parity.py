"""Serving PEFT adapters in-process against transformers running PEFT's merged model: greedy
tokens identical and log-probabilities close, for q/v-only adapters, every-linear adapters
(attention, dense and shared-expert MLPs, MoE gates, routed experts as 3-D factors and per
expert) and 3-D expert `target_parameters`, on each tiny architecture (peft_cases.py); a
batch mixing the base model and every adapter gives every request the tokens it gets alone
(MLA's kv_b_proj included, in its absorbed and expanded forms); and the prefix cache never
mixes adapters."""

from __future__ import annotations

import pytest

from serve_app.engine.errors import InvalidRequestError
from serve_app.engine.request import SamplingParams
from serve_app.runtime.llm import LLM
from tests.conftest import tiny_model_dir
from tests.lora.peft_cases import CASES, check_adapters_alone_and_mixed, engine_kwargs
from tests.lora.test_peft_format import make_peft_adapter
from tests.model.test_parity import PROMPTS

peft = pytest.importorskip("peft")


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(CASES))
def test_adapters_match_peft_merged_transformers(arch, parity_adapters):
    adapters = parity_adapters(arch)
    llm = LLM(str(tiny_model_dir(arch)), **engine_kwargs(adapters))
    check_adapters_alone_and_mixed(llm, tiny_model_dir(arch), adapters)


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
