"""Quantized experts held by expert shards: the engine over 2 shard actors (the wire unchanged)
gives transformers' greedy tokens on the dequantized weights, and a shard's quantized experts
split, add and drop like float ones, at a fraction of the bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serve_app.deployments.remote_experts import RemoteExperts
from serve_app.engine.config import EngineConfig
from serve_app.engine.request import SamplingParams
from serve_app.experts.placement import place_experts
from serve_app.experts.quantized import QuantExpertWeights
from serve_app.experts.shard import ExpertShard
from serve_app.model.config import load_model_spec
from serve_app.model.quant.scheme import Quantization
from serve_app.runtime.factory import build_engine
from serve_app.runtime.llm import LLM
from tests.model.test_bf16_parity import BF16_KV_ATOL, bf16_kv
from tests.model.test_parity import (
    TOP,
    assert_matches,
    dequantized_checkpoint,
    hf_reference,
)
from tests.model.test_quant_parity import QUANT_NEW, QUANT_PROMPTS

CPU = torch.device("cpu")


@pytest.mark.parametrize("method", ["int8", "int4", "bf16"])  # bf16: engine.dtype bfloat16
def test_quantized_shards_split_add_and_drop_like_float_ones(qwen3_tiny, method):
    quant = Quantization(method)
    spec = load_model_spec(qwen3_tiny)
    full = ExpertShard(str(qwen3_tiny), list(range(spec.num_experts)), CPU, torch.float32, quant)
    plain = ExpertShard(str(qwen3_tiny), list(range(spec.num_experts)), CPU, torch.float32)
    assert all(isinstance(w, QuantExpertWeights) for w in full.layers.values())
    if method == "bf16":
        assert full.num_bytes() == plain.num_bytes() // 2
    else:
        assert full.num_bytes() < plain.num_bytes() / 3
    g = np.random.default_rng(0)
    x = g.standard_normal((6, spec.hidden_size)).astype(np.float32)
    ids = np.array([[0, 5], [1, 2], [7, 3], [4, 6], [2, 5], [6, 1]])
    w = g.random((6, 2)).astype(np.float32)
    layer = next(iter(full.layers))
    want = full.forward(layer, x, ids, w)
    assert not np.allclose(want, plain.forward(layer, x, ids, w), atol=1e-6)  # quantized

    half = ExpertShard(str(qwen3_tiny), [0, 1, 2, 3], CPU, torch.float32, quant)
    other = ExpertShard(str(qwen3_tiny), [4, 5, 6, 7], CPU, torch.float32, quant)
    mine, theirs = np.where(ids < 4, ids, -1), np.where(ids >= 4, ids, -1)
    split = half.forward(layer, x, mine, w) + other.forward(layer, x, theirs, w)
    np.testing.assert_allclose(split, want, atol=1e-5)
    half.add_experts([4, 5, 6, 7])
    half.drop_experts([0, 1, 2, 3])
    np.testing.assert_allclose(
        half.forward(layer, x, theirs, w), other.forward(layer, x, theirs, w), atol=1e-6
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, dtype",
    # int8 shards: the split test above, local parity. bfloat16: the shard actors read the
    # routers' dtype as the engine does (serve_app/model/quant/precision.py): bf16 experts
    [("int4", "float32"), ("none", "bfloat16")],
)
def test_engine_over_quantized_shard_actors_matches_dequantized_transformers(
    ray_cluster, qwen3_tiny, method, dtype, tmp_path_factory
):
    from serve_app.deployments.expert_actor import ExpertShardActor

    model = str(qwen3_tiny)
    spec = load_model_spec(model)
    placement = place_experts(spec.num_experts, 2)
    actors = [
        ExpertShardActor.options(num_cpus=0).remote(model, list(s), "cpu", dtype, 1, method, None)
        for s in placement.shards
    ]
    float_bytes = ExpertShard(model, list(placement.shards[0]), CPU, torch.float32).num_bytes()
    info = [ray_cluster.get(a.info.remote()) for a in actors]
    assert all(i["weight_bytes"] <= float_bytes / (2 if dtype == "bfloat16" else 3) for i in info)

    config = EngineConfig(
        model=model, num_kv_blocks=256, block_size=16, quantization=method, dtype=dtype
    )
    engine = build_engine(config, RemoteExperts(placement, lambda s: actors[s]))
    params = SamplingParams(temperature=0, max_tokens=QUANT_NEW, ignore_eos=True, logprobs=TOP)
    llm = LLM.over(engine)
    results = llm.generate(QUANT_PROMPTS, params)
    ref_dir = dequantized_checkpoint(
        qwen3_tiny, Quantization("bf16" if dtype == "bfloat16" else method),
        tmp_path_factory.getbasetemp(),
    )  # fmt: skip
    if dtype == "bfloat16":  # the KV cache is bf16 too: the reference rounds its K/V alike
        refs = hf_reference(ref_dir, llm.tokenizer, QUANT_PROMPTS, QUANT_NEW, adapt=bf16_kv)
        assert_matches(results, refs, QUANT_PROMPTS, BF16_KV_ATOL)
    else:
        refs = hf_reference(ref_dir, llm.tokenizer, QUANT_PROMPTS, QUANT_NEW)
        assert_matches(results, refs, QUANT_PROMPTS)
    for a in actors:
        ray_cluster.kill(a)
