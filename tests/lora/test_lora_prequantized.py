"""LoRA adapters on a pre-quantized base (the QLoRA case: a GPTQ / compressed-tensors
checkpoint, adapters trained on it): each adapter alone gives transformers + PEFT's merged
model over the dequantized weights' greedy tokens, and a batch mixing the base and the
adapters gives each request its tokens alone. The base shapes an adapter is checked against
come from the quantized tensors' headers (no float `weight` there)."""

from __future__ import annotations

import pytest

from serve_app.model.loader import base_shapes
from serve_app.runtime.llm import LLM
from tests.lora.peft_cases import check_adapters_alone_and_mixed, engine_kwargs
from tests.lora.test_peft_format import make_peft_adapter
from tests.model.quant_formats_packing import prequantized

peft = pytest.importorskip("peft")

CASES = [
    # (arch, checkpoint kind, adapter kinds): every linear incl. each routed expert
    ("qwen3_moe", "gptq", {"all": {"target_modules": "all-linear"}}),
    ("deepseek_v3", "ct-int8", {"all": {"target_modules": "all-linear"}}),  # kv_b_proj too
]  # fmt: skip


@pytest.mark.parametrize("arch,kind,cases", CASES, ids=[f"{a}-{k}" for a, k, _ in CASES])
def test_adapters_on_a_prequantized_base_match_peft_merged_on_its_dequantized_weights(
    arch, kind, cases, tmp_path, tmp_path_factory
):
    model, ref = prequantized(arch, kind, tmp_path_factory.getbasetemp())
    adapters = {
        name: make_peft_adapter(ref, tmp_path / name, seed=i + 1, **kw)
        for i, (name, kw) in enumerate(cases.items())
    }
    llm = LLM(str(model), **engine_kwargs(adapters))
    check_adapters_alone_and_mixed(llm, ref, adapters)


@pytest.mark.parametrize("kind", ["gptq", "awq", "ct-int4", "ct-int8", "fp8"])
def test_each_format_gives_its_linears_shapes_from_the_headers(kind, tmp_path_factory):
    """What an adapter is checked against: the same [N, K] per linear as the float
    checkpoint's, for every pre-quantized format."""
    arch = "deepseek_v3" if kind == "fp8" else "qwen3_moe"
    model, ref = prequantized(arch, kind, tmp_path_factory.getbasetemp())
    assert base_shapes(model) == base_shapes(ref)
