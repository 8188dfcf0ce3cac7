"""Quantized weights (int8 per channel, int4 per group) against transformers running the
DEQUANTIZED weights in float32: greedy tokens identical and log-probabilities close, for every
tiny architecture, with chunked prefill, prefix hits and the experts in this process (remote
experts: tests/experts/test_quantized_experts.py). What stays float, and what is refused at
load, is checked here too."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from serve_app.engine.request import SamplingParams
from serve_app.experts.quantized import QuantExpertWeights
from serve_app.model.loader import check_quantization
from serve_app.model.quant.linear import Int4Linear, Int8Linear, QuantLinear
from serve_app.model.quant.scheme import Quantization, QuantizationError
from serve_app.runtime.llm import LLM
from tests.model.test_parity import (
    PROMPTS,
    TOP,
    assert_matches,
    dequantized_checkpoint,
    hf_reference,
)

SCHEMES = {"int8": Quantization("int8"), "int4": Quantization("int4")}
# two of the parity prompts sharing a long prefix (a prefix-cache hit), 16 tokens each: the 12
# runs (6 architectures x 2 schemes) stay cheap
QUANT_PROMPTS = PROMPTS[2:4]
QUANT_NEW = 16


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(SCHEMES))
def test_quantized_greedy_parity_with_dequantized_transformers(
    tiny_model, method, tmp_path_factory
):
    quant = SCHEMES[method]
    llm = LLM(
        str(tiny_model), block_size=16, num_kv_blocks=256, max_num_batched_tokens=64,
        quantization=method,
    )  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=QUANT_NEW, ignore_eos=True, logprobs=TOP)
    results = llm.generate(QUANT_PROMPTS, params)
    reference_dir = dequantized_checkpoint(tiny_model, quant, tmp_path_factory.getbasetemp())
    refs = hf_reference(reference_dir, llm.tokenizer, QUANT_PROMPTS, QUANT_NEW)
    assert_matches(results, refs, QUANT_PROMPTS)
    assert llm.engine.stats().prefix_hit_tokens > 0

    model = llm.engine.runner.model
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert linears and all(
        type(m) is (Int8Linear if method == "int8" else Int4Linear) for m in linears
    )
    # what stays float: the LM head, the embeddings, the MoE gates, every norm
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32
    floats = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m) is nn.Linear}
    assert floats <= {"lm_head", "shared_expert_gate", "kv_b_proj"}
    if model.spec.is_moe:
        experts = llm.engine.runner.model.moe_blocks()[0].experts
        assert all(isinstance(w, QuantExpertWeights) for w in experts.layers.values())


def test_a_group_size_that_does_not_divide_a_matrix_is_refused_at_load(tmp_path):
    """llama tiny: every K is a multiple of 64, none of 128. The CLIs check the checkpoint's
    headers before anything loads (check_quantization); loading refuses it too."""
    from tests.conftest import tiny_model_dir

    model = tiny_model_dir("llama")
    check_quantization(model, Quantization("int4", 64))
    with pytest.raises(QuantizationError, match=r"has 64 inputs, not a multiple of .* 128$"):
        check_quantization(model, Quantization("int4", 128))
    with pytest.raises(QuantizationError, match=r"model\.layers\.0\.\S+ has 64 inputs.*128"):
        LLM(str(tiny_model_dir("llama")), num_kv_blocks=16, quantization="int4",
            quantization_group_size=128)  # fmt: skip
