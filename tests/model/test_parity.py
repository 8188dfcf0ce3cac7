"""Greedy parity with transformers' own implementation of each architecture, same weights.

All prompts are submitted at once, several share long prefixes (prefix-cache hits), prefill is
chunked by a small token budget, and a small KV pool forces preemption by recompute.
Tolerance: per-step log-probabilities within 2e-4 (fp32; logits differ only by summation order).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from serve_app.engine.request import SamplingParams
from serve_app.model.loader import iter_weights
from serve_app.model.quant.methods import quantizes
from serve_app.model.quant.scheme import Quantization, fake_quantize
from serve_app.runtime.llm import LLM

MAX_NEW = 24
TOP = 5
ATOL = 2e-4

SHARED = (
    "In the quiet valley the river bends twice before it reaches the old stone mill, "
    "where the miller keeps a ledger of every sack of grain that passes his door. "
)
PROMPTS = [
    "Hello",
    "The capital of France is",
    SHARED + "On Monday he wrote",
    SHARED + "On Tuesday the rain came and",
    SHARED * 2 + "Years later, his daughter",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "café, naïve, 東京 and 🙂 are all",
    "1, 2, 3, 5, 8, 13, 21,",
    SHARED + "On Monday he wrote",  # exact duplicate: a full prefix hit
]


_REFS: dict[tuple, list] = {}


def hf_reference(
    model_dir, tokenizer, prompts, max_new: int = MAX_NEW, dtype=torch.float32, adapt=None
):
    """transformers generate, one prompt at a time (no padding), cached per checkpoint; the
    model run in `dtype` (log-probabilities in float32), changed by `adapt(model)` after load
    if given (e.g. its KV rounded as a bf16 cache holds it: test_bf16_parity.py)."""
    key = (str(model_dir), tuple(prompts), max_new, dtype, adapt)
    if key not in _REFS:
        _REFS[key] = _hf_generate(model_dir, tokenizer, prompts, max_new, dtype, adapt)
    return _REFS[key]


def dequantized_checkpoint(model_dir: Path, quant: Quantization, out_root: Path) -> Path:
    """A copy of the checkpoint whose quantized tensors (serve_app/model/quant/methods.py)
    hold their dequantized float32 values: what transformers runs as the reference of a
    quantized engine. Written once per (checkpoint, scheme) under out_root."""
    out = out_root / f"{Path(model_dir).name}-{quant.tag()}"
    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True)
    weights = {}
    for name, t in iter_weights(model_dir):
        weights[name] = fake_quantize(t, quant, name) if quantizes(name, quant.method) else t
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in ("config.json", "generation_config.json"):
        if (Path(model_dir) / f).exists():
            shutil.copy(Path(model_dir) / f, out / f)
    return out


def _hf_generate(model_dir, tokenizer, prompts, max_new, dtype=torch.float32, adapt=None):
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    if adapt is not None:
        adapt(hf)
    refs = []
    for p in prompts:
        ids = tokenizer(p, return_tensors="pt").input_ids
        out = hf.generate(
            ids,
            max_new_tokens=max_new,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=None,  # compare full length; the engine gets ignore_eos
        )
        tokens = out.sequences[0, ids.shape[1] :].tolist()
        logprobs = [torch.log_softmax(step[0].float(), -1) for step in out.logits]
        refs.append((tokens, logprobs))
    return refs


def assert_matches(results, refs, prompts=PROMPTS, atol: float = ATOL) -> None:
    """Greedy tokens identical to transformers', top-k log-probabilities within atol."""
    for prompt, res, (ref_tokens, ref_lp) in zip(prompts, results, refs, strict=True):
        choice = res.choices[0]
        assert choice.token_ids == ref_tokens, f"greedy tokens differ for {prompt!r}"
        for step, (lp, ref) in enumerate(zip(choice.logprobs, ref_lp, strict=True)):
            ours = torch.tensor([v for _, v in lp.top])
            theirs = ref[[t for t, _ in lp.top]]
            assert torch.allclose(ours, theirs, atol=atol), f"{prompt!r} step {step}"
            assert abs(lp.logprob - ref[choice.token_ids[step]].item()) < atol


@pytest.mark.slow
@pytest.mark.parametrize(
    "engine_kwargs",
    [
        pytest.param(dict(num_kv_blocks=256, max_num_batched_tokens=64), id="chunked"),
        pytest.param(dict(num_kv_blocks=24, max_num_batched_tokens=48), id="preempting"),
    ],
)
def test_greedy_parity(tiny_model, engine_kwargs):
    llm = LLM(str(tiny_model), block_size=16, **engine_kwargs)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=TOP)
    results = llm.generate(PROMPTS, params)
    assert_matches(results, hf_reference(tiny_model, llm.tokenizer, PROMPTS))

    stats = llm.engine.stats()
    assert stats.kv_blocks_used == 0, "blocks leaked"
    assert stats.prefix_hit_tokens > 0, "shared prefixes should hit the prefix cache"
    if engine_kwargs["num_kv_blocks"] < 32:
        assert stats.num_preemptions > 0, "the small pool should force preemption"
