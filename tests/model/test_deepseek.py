"""DeepSeek-V2/V3 against transformers: config variants, routing rules, the latent KV cache.

The default tiny presets run in tests/model/test_parity.py (chunked prefill, preemption, prefix
hits). Here: the variants a real checkpoint may bring (no q LoRA, odd head counts and latent /
rope dims, rows the C kernels do not take, every routing method, the older `rope_scaling`
config form), each greedy-identical to transformers with logits close, and what the cache
holds per token.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from serve_app.engine.model_runner import kv_block_bytes
from serve_app.engine.request import SamplingParams
from serve_app.kvstore.codec import CodecError, KVLayout, decode_block, encode_block
from serve_app.kvstore.connector import kv_layout
from serve_app.model.config import RoutingSpec, load_model_spec
from serve_app.model.digest import model_digest
from serve_app.model.layers.routing import make_routing_rule
from serve_app.runtime.llm import LLM
from serve_app.tools.make_model import Variant, make_model
from tests.conftest import tiny_model_dir
from tests.model.test_parity import PROMPTS, TOP, assert_matches, hf_reference

VARIANTS = {
    # no q LoRA (q_proj), 3 heads, latent 40 + rope 24 (neither a multiple of 64: kernel path)
    "v3-no-q-lora-odd-heads": (
        "deepseek_v3",
        Variant(preset={"num_heads": 3, "num_kv_heads": 3}, mla={"q_lora_rank": None,
                "kv_lora_rank": 40, "qk_rope_head_dim": 24, "qk_nope_head_dim": 20,
                "v_head_dim": 28}),
    ),
    # latent 36 + rope 10 = 46 floats a row: no multiple of 16, the torch attention path
    "v3-torch-path-one-group": (
        "deepseek_v3",
        Variant(mla={"kv_lora_rank": 36, "qk_rope_head_dim": 10, "n_group": 1, "topk_group": 1,
                     "yarn_factor": None}),
    ),
    "v2-greedy-no-scaling": (
        "deepseek_v2",
        Variant(mla={"routed_scaling_factor": 1.0, "yarn_factor": None},
                config={"topk_method": "greedy"}),
    ),
}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant_dir(request, tmp_path_factory):
    arch, variant = VARIANTS[request.param]
    return make_model(arch, "tiny", tmp_path_factory.mktemp(request.param), 0, variant)


def _generate(model_dir, **engine):
    llm = LLM(str(model_dir), block_size=16, **engine)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=TOP)
    return llm, llm.generate(PROMPTS, params)


def _assert_matches_transformers(llm, results, model_dir) -> None:
    assert_matches(results, hf_reference(model_dir, llm.tokenizer, PROMPTS))
    assert llm.engine.stats().kv_blocks_used == 0


@pytest.mark.slow
def test_variants_match_transformers_chunked_and_preempting(variant_dir):
    llm, results = _generate(variant_dir, num_kv_blocks=24, max_num_batched_tokens=48)
    _assert_matches_transformers(llm, results, variant_dir)
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0 and stats.prefix_hit_tokens > 0


@pytest.mark.slow
def test_the_older_rope_scaling_config_form_is_served_the_same(tmp_path):
    """Configs written before transformers' rope_parameters carry `rope_scaling` (DeepSeek's own
    V2/V3 configs): the same yarn rope, the same softmax scale, the same tokens."""
    src = tiny_model_dir("deepseek_v3")
    out = tmp_path / "v3-rope-scaling"
    out.mkdir()
    for f in src.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    raw = json.loads((src / "config.json").read_text())
    params = raw.pop("rope_parameters")
    raw["rope_theta"] = params.pop("rope_theta")
    raw["rope_scaling"] = {**{k: v for k, v in params.items() if k != "rope_type"}, "type": "yarn"}
    (out / "config.json").write_text(json.dumps(raw))
    a, b = load_model_spec(src), load_model_spec(out)
    assert a.mla == b.mla and a.mla.softmax_scale != (48**-0.5)  # yarn's mscale applies
    llm, results = _generate(out, num_kv_blocks=256, max_num_batched_tokens=64)
    _assert_matches_transformers(llm, results, out)


def _hf_router(arch: str, model_dir, layer: int = 1):
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert hf.config.architectures == [arch]
    return hf.model.layers[layer].mlp.gate


@pytest.mark.parametrize(
    ("arch", "variant"),
    [
        ("DeepseekV3ForCausalLM", None),
        ("DeepseekV2ForCausalLM", None),  # group_limited_greedy
        ("DeepseekV2ForCausalLM", Variant(config={"topk_method": "greedy"})),
    ],
)
def test_routing_rules_pick_transformers_experts_and_weights(arch, variant, tmp_path):
    name = "deepseek_v3" if "V3" in arch else "deepseek_v2"
    model_dir = (
        make_model(name, "tiny", tmp_path / "m", 0, variant) if variant else (tiny_model_dir(name))
    )
    hf_gate = _hf_router(arch, model_dir)
    spec = load_model_spec(model_dir)
    rule = make_routing_rule(spec.routing)
    x = torch.randn(256, spec.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, ref_w, ref_ids = hf_gate(x)
        bias = getattr(hf_gate, "e_score_correction_bias", None)
        ids, w = rule.route(torch.nn.functional.linear(x, hf_gate.weight.float()), bias)
    order, ref_order = ids.argsort(-1), ref_ids.argsort(-1)
    assert torch.equal(ids.gather(1, order), ref_ids.gather(1, ref_order))
    assert torch.allclose(w.gather(1, order), ref_w.gather(1, ref_order), atol=1e-6)
    if bias is not None:  # the correction bias changes the choice, not the weights
        unbiased, _ = rule.route(torch.nn.functional.linear(x, hf_gate.weight.float()), None)
        assert not torch.equal(unbiased.sort(-1).values, ids.sort(-1).values)


def test_softmax_rule_renormalises_only_when_asked():
    logits = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    _, w = make_routing_rule(RoutingSpec("softmax", 2, True)).route(logits)
    assert torch.allclose(w.sum(-1), torch.ones(8))
    _, raw = make_routing_rule(RoutingSpec("softmax", 2, False)).route(logits)
    assert (raw.sum(-1) < 1).all()


def test_the_cache_holds_one_latent_row_per_token_and_layer():
    model_dir = tiny_model_dir("deepseek_v3")
    spec = load_model_spec(model_dir)
    llm = LLM(str(model_dir), block_size=16, num_kv_blocks=32)
    caches = llm.engine.runner.kv_caches
    latent = spec.mla.kv_lora_rank + spec.mla.qk_rope_head_dim  # 48 + 16
    assert len(caches) == spec.num_layers
    assert all(len(layer) == 1 and layer[0].shape == (32, 16, 1, latent) for layer in caches)
    assert kv_block_bytes(spec, 16, torch.float32) == spec.num_layers * 16 * latent * 4
    assert llm.engine.stats().kv_block_bytes == spec.num_layers * 16 * latent * 4
    # expanded K/V would be 2 x heads x (nope + rope) per token and layer
    expanded = 2 * spec.num_heads * (spec.mla.qk_nope_head_dim + spec.mla.qk_rope_head_dim)
    assert latent < expanded
    layout = kv_layout(llm.engine.runner)
    assert (layout.parts, layout.num_kv_heads, layout.head_dim) == (1, 1, latent)
    assert layout.segments == (48, 16)  # INT8 scales the latent and the rope key apart


def test_a_latent_block_is_never_served_to_a_kv_model_or_back():
    mla = LLM(str(tiny_model_dir("deepseek_v3")), block_size=16, num_kv_blocks=32).engine
    mha = LLM(str(tiny_model_dir("qwen3_moe")), block_size=16, num_kv_blocks=32).engine
    lat, kv = kv_layout(mla.runner), kv_layout(mha.runner)
    assert mla.stats().kv_format.startswith("mla:") and mha.stats().kv_format.startswith("mha:")
    h = bytes(32)
    block = mla.runner.read_blocks([0])[0].numpy()
    for int8 in (False, True):
        entry = encode_block(h, block, lat, int8=int8)
        assert decode_block(entry, h, lat, int8=int8).shape == block.shape
        with pytest.raises(CodecError, match="layout mismatch"):
            decode_block(entry, h, kv, int8=int8)
        other = encode_block(h, mha.runner.read_blocks([0])[0].numpy(), kv, int8=int8)
        with pytest.raises(CodecError, match="layout mismatch"):
            decode_block(other, h, lat, int8=int8)
    # the same checkpoint under another KV format hashes its blocks elsewhere (namespace)
    model_dir = tiny_model_dir("deepseek_v3")
    assert model_digest(model_dir, kv_format="mla:1x1x64") != model_digest(
        model_dir, kv_format="mha:2x4x48"
    )
    assert mla.model_digest != mha.model_digest


def test_int8_codec_scales_the_latent_and_the_rope_key_apart():
    """A rope key 100x larger than the latent must not wipe out the latent's precision."""
    layout = KVLayout(2, 16, 1, 64, "float32", parts=1, segments=(48, 16))
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(2, 1, 16, 1, 64, generator=g)
    kv[..., 48:] *= 100
    back = decode_block(encode_block(bytes(32), kv.numpy(), layout, int8=True), bytes(32), layout,
                        int8=True)  # fmt: skip
    err = (torch.from_numpy(back) - kv).abs()
    assert err[..., :48].max() <= kv[..., :48].abs().amax() / 254 + 1e-6
    assert err[..., 48:].max() <= kv[..., 48:].abs().amax() / 254 + 1e-4


def test_mtp_layers_beyond_num_hidden_layers_are_not_loaded(tmp_path):
    """DeepSeek-V3 checkpoints carry a multi-token-prediction layer past the last one."""
    from safetensors.torch import load_file, save_file

    src = tiny_model_dir("deepseek_v3")
    out = tmp_path / "with-mtp"
    out.mkdir()
    for f in src.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(src / "model.safetensors"))
    n = AutoConfig.from_pretrained(src).num_hidden_layers
    extra = {k.replace("layers.2.", f"layers.{n}.", 1): v.clone() for k, v in weights.items()
             if k.startswith("model.layers.2.")}  # fmt: skip
    save_file({**weights, **extra}, str(out / "model.safetensors"), metadata={"format": "pt"})
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    a = LLM(str(src), num_kv_blocks=32).generate(["Hello there"], params)[0]
    b = LLM(str(out), num_kv_blocks=32).generate(["Hello there"], params)[0]
    assert a.choices[0].token_ids == b.choices[0].token_ids
