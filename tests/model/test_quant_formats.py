"""Pre-quantized checkpoints (GPTQ, AWQ GEMM, compressed-tensors, DeepSeek FP8-block).

The packers (tests/model/quant_formats_packing.py) follow each format's own packing rules
(AutoGPTQ's `pack`, AutoAWQ's WQLinear_GEMM, compressed-tensors' `pack_to_int32`, DeepSeek's
block scales), written from those rules, not from the loader: each format's unpacking must
round-trip bit-exactly. End to
end, a tiny checkpoint written in the format is served and its greedy tokens must equal
transformers' on the weights as we hold them (zero = (8 - z) * s in fp32, computed here from
the packed integers). Refusals: one line naming what is not supported.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from serve_app.engine.request import SamplingParams
from serve_app.experts.quantized import QuantExpertWeights
from serve_app.experts.shard import ExpertShard
from serve_app.model.loader import check_quantization, iter_weights
from serve_app.model.quant.formats.awq import AWQ_ORDER
from serve_app.model.quant.linear import Int4Linear, Int8Linear
from serve_app.model.quant.scheme import Int4Weight, Int8Weight, Quantization, QuantizationError
from serve_app.runtime.llm import LLM
from tests.conftest import tiny_model_dir
from tests.model.quant_formats_packing import (
    AWQ_CONFIG,
    FP8_CONFIG,
    GPTQ_CONFIG,
    G,
    awq_tensors,
    ct_config,
    ct_int4_tensors,
    fmt_of,
    gptq_tensors,
    ours_int4,
    pack_int32,
    prequantized,
)
from tests.model.test_parity import TOP, assert_matches, dequantized_checkpoint, hf_reference
from tests.model.test_quant_parity import QUANT_NEW, QUANT_PROMPTS

# ---- unpacking round-trips bit-exactly ----------------------------------------------------


def _random_int4(n=64, k=128):
    torch.manual_seed(0)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    z = torch.randint(1, 16, (n, k // G), dtype=torch.uint8)  # v1 stores z - 1 >= 0
    s = (torch.rand(n, k // G) * 0.1 + 1e-3).half()
    return q, z, s


@pytest.mark.parametrize("v1", [True, False], ids=["gptq", "gptq_v2"])
def test_gptq_unpacks_exactly(v1):
    q, z, s = _random_int4()
    packed = gptq_tensors(q, z, s, v1)
    config = GPTQ_CONFIG | ({} if v1 else {"checkpoint_format": "gptq_v2"})
    w = fmt_of(config).load(packed, "x.weight")
    assert isinstance(w, Int4Weight) and w.group == G
    assert torch.equal(w.q, q) and torch.equal(w.scale, s.float())
    z_back = torch.round(8 - w.zero / w.scale).to(torch.uint8)  # exact: zero = (8 - z) * s
    assert torch.equal(z_back, z)
    assert torch.equal(gptq_tensors(w.q, z_back, w.scale.half(), v1)["qweight"], packed["qweight"])
    assert torch.equal(w.dequantize(), ours_int4(q, z, s))
    # within one fp32 rounding of the format's own (q - z) * s
    theirs = (q.float().view(64, -1, G) - z.float()[..., None]) * s.float()[..., None]
    theirs = theirs.view(64, -1)
    assert torch.allclose(w.dequantize(), theirs, rtol=0, atol=1e-6)


def test_gptq_int8_per_channel_unpacks_exactly():
    torch.manual_seed(0)
    q = torch.randint(0, 256, (32, 64))
    s = (torch.rand(1, 32) * 0.1).half()
    packed = {"qweight": pack_int32(q, 8).t().contiguous(),
              "qzeros": pack_int32(torch.full((1, 32), 127), 8), "scales": s}  # fmt: skip
    w = fmt_of(GPTQ_CONFIG | {"bits": 8, "group_size": -1}).load(packed, "x.weight")
    assert isinstance(w, Int8Weight)
    assert torch.equal(w.q.long() + 128, q) and torch.equal(w.scale, s[0].float())


def test_awq_unpacks_exactly():
    q, z, s = _random_int4()
    packed = awq_tensors(q, z, s)
    w = fmt_of(AWQ_CONFIG).load(packed, "x.weight")
    assert torch.equal(w.q, q) and torch.equal(w.scale, s.float())
    z_back = torch.round(8 - w.zero / w.scale).to(torch.uint8)
    assert torch.equal(z_back, z)
    assert torch.equal(awq_tensors(w.q, z_back, w.scale.half())["qweight"], packed["qweight"])
    # AWQ's interleave, one word by hand: columns 0..7 = 0..7 pack as nibbles 0,2,4,6,1,3,5,7
    word = pack_int32(torch.arange(8)[None], 4, AWQ_ORDER)
    assert int(word) == 0x75316420


def test_compressed_tensors_unpack_exactly():
    torch.manual_seed(0)
    qs = torch.randint(-8, 8, (64, 128), dtype=torch.int8)
    s = torch.rand(64, 128 // G).to(torch.bfloat16)
    packed = ct_int4_tensors(qs, s)
    w = fmt_of(ct_config("pack-quantized", 4, "group", G)).load(packed, "x.weight")
    assert torch.equal(w.q.long() - 8, qs.long()) and torch.equal(w.scale, s.float())
    assert torch.equal(w.zero, torch.zeros_like(w.scale))
    assert torch.equal(ct_int4_tensors((w.q.long() - 8), w.scale.bfloat16())["weight_packed"],
                       packed["weight_packed"])  # fmt: skip
    q8 = torch.randint(-128, 128, (64, 128), dtype=torch.int8)
    s8 = torch.rand(64, 1).half()
    w8 = fmt_of(ct_config("int-quantized", 8, "channel")).load(
        {"weight": q8, "weight_scale": s8}, "x.weight"
    )
    assert torch.equal(w8.q, q8) and torch.equal(w8.scale, s8[:, 0].float())


def test_compressed_tensors_asymmetric_int4_and_packed_int8_unpack_exactly():
    """Asymmetric W4A16: zero points z + 8 packed along N (dim 0), or int8 z unpacked, and
    w = (q - z) * s; W8A16 pack-quantized: 4 values of K a word, stored q + 128."""
    torch.manual_seed(0)
    qs = torch.randint(-8, 8, (64, 128), dtype=torch.int8)
    zp = torch.randint(-8, 8, (64, 128 // G), dtype=torch.int8)
    s = torch.rand(64, 128 // G).half()
    fmt = fmt_of(ct_config("pack-quantized", 4, "group", G, symmetric=False))
    want = (qs.float() - zp.float().repeat_interleave(G, 1)) * s.float().repeat_interleave(G, 1)
    for stored in (pack_int32(zp.long().t() + 8, 4).t().contiguous(), zp):  # [N / 8, K / G]
        w = fmt.load(ct_int4_tensors(qs, s) | {"weight_zero_point": stored}, "x.weight")
        assert torch.equal(w.q.long() - 8, qs.long()) and torch.equal(w.scale, s.float())
        assert torch.equal(torch.round(8 - w.zero / w.scale), zp.float() + 8)  # stored z + 8
        assert torch.allclose(w.dequantize(), want, rtol=0, atol=1e-6)
    q8 = torch.randint(-128, 128, (64, 128), dtype=torch.int8)
    s8 = torch.rand(64, 1)
    packed = {"weight_packed": pack_int32(q8.long() + 128, 8), "weight_scale": s8,
              "weight_shape": torch.tensor([64, 128])}  # fmt: skip
    w8 = fmt_of(ct_config("pack-quantized", 8, "channel")).load(packed, "x.weight")
    assert torch.equal(w8.q, q8) and torch.equal(w8.scale, s8[:, 0])


def test_fp8_block_dequantizes_each_block_with_its_scale():
    torch.manual_seed(0)
    w8 = torch.randn(80, 72).to(torch.float8_e4m3fn)  # partial blocks on both dims
    s = torch.rand(3, 3) + 0.5
    out = fmt_of(FP8_CONFIG).load({"weight": w8, "weight_scale_inv": s}, "x.weight")
    assert out.dtype == torch.float32
    assert torch.equal(out[33, 70], w8[33, 70].float() * s[1, 2])
    assert torch.equal(out[79, 0], w8[79, 0].float() * s[2, 0])


# ---- end to end: a tiny checkpoint in each format, served ---------------------------------


CASES = [
    ("qwen3_moe", "gptq", "none", Int4Linear),
    ("qwen3_moe", "awq", "int4", Int4Linear),  # the checkpoint's own scheme, asked: accepted
    ("qwen3_moe", "ct-int4", "none", Int4Linear),
    ("deepseek_v3", "gptq", "none", Int4Linear),
    ("deepseek_v3", "ct-int8", "none", Int8Linear),
    ("deepseek_v3", "fp8", "none", None),
    ("deepseek_v3", "fp8", "int8", Int8Linear),  # dequantized, then our int8
]


@pytest.mark.slow
@pytest.mark.parametrize("arch,kind,quantization,linear", CASES)
def test_prequantized_greedy_parity(arch, kind, quantization, linear, tmp_path_factory):
    root = tmp_path_factory.getbasetemp()
    model, ref = prequantized(arch, kind, root)
    llm = LLM(str(model), block_size=16, num_kv_blocks=64, max_num_batched_tokens=64,
              quantization=quantization)  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=QUANT_NEW, ignore_eos=True, logprobs=TOP)
    results = llm.generate(QUANT_PROMPTS, params)
    if kind == "fp8" and quantization == "int8":
        ref = dequantized_checkpoint(ref, Quantization("int8"), root)
    refs = hf_reference(ref, llm.tokenizer, QUANT_PROMPTS, QUANT_NEW)
    assert_matches(results, refs, QUANT_PROMPTS)

    model_ = llm.engine.runner.model
    held = [type(m) for m in model_.modules() if isinstance(m, (Int4Linear, Int8Linear))]
    assert (set(held) == {linear}) if linear else not held
    experts = model_.moe_blocks()[0].experts
    assert all(isinstance(w, QuantExpertWeights) for w in experts.layers.values()) == bool(linear)
    stats = llm.engine.stats()
    assert stats.quantization == {"gptq": "int4-g32", "awq": "int4-g32", "ct-int4": "int4-g32",
                                  "ct-int8": "int8"}.get(kind, quantization)  # fmt: skip


def test_an_expert_shard_holds_prequantized_experts_as_the_checkpoint_has_them(
    tmp_path_factory,
):
    """A shard (remote experts) loads and adds pre-quantized experts without a float round
    trip: each matrix it holds dequantizes to the reference's, bit for bit."""
    model, ref = prequantized("qwen3_moe", "gptq", tmp_path_factory.getbasetemp())
    shard = ExpertShard(str(model), [1, 5], torch.device("cpu"), torch.float32)
    shard.add_experts([2])
    w = shard.layers[0]
    assert isinstance(w, QuantExpertWeights) and w.expert_ids == [1, 5, 2]
    t = dict(iter_weights(ref))
    for local, e in enumerate(w.expert_ids):
        name = f"model.layers.0.mlp.experts.{e}"
        gate_up = torch.cat([t[f"{name}.gate_proj.weight"], t[f"{name}.up_proj.weight"]])
        assert torch.equal(w.w13.dequantized(local), gate_up)
        assert torch.equal(w.w2.dequantized(local), t[f"{name}.down_proj.weight"])


def test_the_digest_names_the_weights_as_held(tmp_path_factory):
    """The prefix cache's namespace: the checkpoint's own scheme asked or not is one version;
    an fp8 checkpoint served float and re-quantized to int8 are two."""
    root = tmp_path_factory.getbasetemp()
    gptq, _ = prequantized("qwen3_moe", "gptq", root)
    fp8, _ = prequantized("qwen3_moe", "fp8", root)

    def digest(model, quantization):
        llm = LLM(str(model), num_kv_blocks=16, quantization=quantization)
        return llm.engine.model_digest

    assert digest(gptq, "none") == digest(gptq, "int4")
    assert digest(fp8, "none") != digest(fp8, "int8")


# ---- refusals: one line naming what is not supported -------------------------------------


def _config_dir(tmp_path: Path, qconfig: dict) -> Path:
    src = tiny_model_dir("qwen3_moe")
    out = tmp_path / "ckpt"
    out.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
        else:
            (out / f.name).symlink_to(f)
    config = json.loads((src / "config.json").read_text()) | {"quantization_config": qconfig}
    (out / "config.json").write_text(json.dumps(config))
    return out


ASYMMETRIC_INT8 = ct_config("int-quantized", 8, "channel")
ASYMMETRIC_INT8["config_groups"]["group_0"]["weights"]["symmetric"] = False
REFUSED = [
    ({"quant_method": "bitsandbytes"}, "none", r"quant_method 'bitsandbytes' is not supported"),
    (GPTQ_CONFIG | {"bits": 3}, "none", r"gptq checkpoint: bits 3 with group_size 32 is not"),
    (GPTQ_CONFIG | {"group_size": 16}, "none", r"gptq checkpoint: group_size 16 is not supported"),
    (AWQ_CONFIG | {"version": "gemv"}, "none", r"awq checkpoint: version 'gemv' is not supported"),
    (
        GPTQ_CONFIG,
        "int8",
        r"quantization int8 asked, but the checkpoint is pre-quantized gptq-int4",
    ),
    (GPTQ_CONFIG, "int4-g64", r"quantization int4-g64 asked, .* gptq-int4-g32"),
    (
        ASYMMETRIC_INT8,
        "none",
        r"compressed-tensors checkpoint: int-quantized asymmetric 8 bits per channel is not",
    ),
    (
        {"quant_method": "fp8", "activation_scheme": "static"},
        "none",
        r"fp8 checkpoint: weight_block_size None",
    ),  # fmt: skip
]


@pytest.mark.parametrize("qconfig,asked,message", REFUSED)
def test_unsupported_prequantized_checkpoints_are_refused_in_one_line(
    tmp_path, qconfig, asked, message
):
    model = _config_dir(tmp_path, qconfig)
    method, _, group = asked.partition("-g")
    quant = Quantization(method, int(group) if group else None)
    with pytest.raises(QuantizationError, match=message) as err:
        check_quantization(model, quant)
    assert "\n" not in str(err.value)


def test_act_order_in_contiguous_runs_maps_by_reordering_scales_and_zeros():
    """desc_act with each run of G inputs in one group, the groups numbered out of order."""
    q, z, s = _random_int4()
    order = torch.tensor([2, 0, 3, 1])  # run r of K uses checkpoint group order[r]
    packed = gptq_tensors(q, z, s)
    packed["g_idx"] = order.repeat_interleave(G).int()
    packed["qzeros"] = pack_int32(z[:, order.argsort()].t().long() - 1, 4)
    packed["scales"] = s[:, order.argsort()].t().contiguous()
    w = fmt_of(GPTQ_CONFIG | {"desc_act": True}).load(packed, "x.weight")
    assert torch.equal(w.dequantize(), ours_int4(q, z, s))


def test_act_order_scattering_a_group_is_refused_naming_the_weight():
    q, z, s = _random_int4()
    packed = gptq_tensors(q, z, s)
    packed["g_idx"] = torch.arange(128).int() % 4
    with pytest.raises(QuantizationError, match=r"^gptq checkpoint: x\.weight has an act-order"):
        fmt_of(GPTQ_CONFIG | {"desc_act": True}).load(packed, "x.weight")
