"""The per-step adapter cap on the tiny model: a batch mixing three adapters and the base model
with max_loras_per_batch 2 gives each request the greedy tokens it gets alone, and no step ran
more than two adapters (the scheduler's output, observed as the engine runs)."""

from __future__ import annotations

import pytest

from serve_app.engine.request import SamplingParams
from serve_app.runtime.llm import LLM
from tests.conftest import tiny_model_dir
from tests.lora.test_peft_format import make_peft_adapter

pytest.importorskip("peft")

PROMPTS = ["The quick brown fox", "Once upon a time there was"]


def test_a_capped_mixed_batch_gives_each_request_its_tokens_alone(tmp_path):
    model_dir = tiny_model_dir("qwen3_moe")
    adapters = {
        f"l{i}": make_peft_adapter(
            model_dir, tmp_path / f"l{i}", seed=i, target_modules=["q_proj", "v_proj"]
        )
        for i in (1, 2, 3)
    }
    llm = LLM(
        str(model_dir), block_size=16, num_kv_blocks=128, max_loras=4, max_loras_per_batch=2,
        enable_prefix_caching=False, lora_adapters=tuple((k, str(d)) for k, d in adapters.items()),
    )  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    names = [None, *adapters]
    alone = {
        name: [c.choices[0].token_ids for c in llm.generate(PROMPTS, params, lora=name)]
        for name in names
    }
    assert len({tuple(map(tuple, v)) for v in alone.values()}) == len(names), "a no-op adapter"

    schedule, per_step = llm.engine.scheduler.schedule, []

    def observed():
        out = schedule()
        per_step.append({id(r.lora) for r in out.requests if r.lora is not None})
        return out

    llm.engine.scheduler.schedule = observed
    prompts = [p for p in PROMPTS for _ in names]
    mixed = llm.generate(prompts, params, lora=[n for _ in PROMPTS for n in names])
    for j, res in enumerate(mixed):
        name, i = names[j % len(names)], j // len(names)
        assert res.choices[0].token_ids == alone[name][i], (name, PROMPTS[i])
    assert max(len(s) for s in per_step) == 2  # the cap held, and bit
