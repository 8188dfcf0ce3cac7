"""Grammar-constrained sampling in the engine (llguidance), on the random-weight tiny model:
only the grammar can make its output valid."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from serve_app.engine.errors import InvalidRequestError
from serve_app.engine.outputs import EngineRequest
from serve_app.engine.request import GrammarSpec, SamplingParams
from serve_app.runtime.llm import LLM

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog"]},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}


def json_spec(schema: dict) -> GrammarSpec:
    return GrammarSpec("json", json.dumps(schema, sort_keys=True))


@pytest.fixture(scope="module")
def llm(qwen3_tiny) -> LLM:
    return LLM(str(qwen3_tiny), num_kv_blocks=128, block_size=16, max_model_len=512)


def assert_no_leaks(llm: LLM) -> None:
    s = llm.engine.stats()
    assert s.kv_blocks_used == 0 and s.num_running == 0 and s.num_waiting == 0
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_output_validates_for_n_sequences(llm, seed):
    p = SamplingParams(
        n=3, temperature=1.0, seed=seed, max_tokens=120, structured=json_spec(SCHEMA)
    )
    choices = llm.generate(["Tell me about a person:"], p)[0].choices
    for c in choices:
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), SCHEMA)
    assert_no_leaks(llm)


def test_greedy_regex_and_choice(llm):
    regex = SamplingParams(
        temperature=0, max_tokens=40, structured=GrammarSpec("regex", r"[a-z]{3}-[0-9]{2,4}")
    )
    choice = SamplingParams(
        temperature=0, max_tokens=20, structured=GrammarSpec("choice", '["yes", "no", "maybe"]')
    )
    free = SamplingParams(temperature=0, max_tokens=8)
    out = llm.generate(["Code:", "Answer:", "Code:"], [regex, choice, free])
    assert re.fullmatch(r"[a-z]{3}-[0-9]{2,4}", out[0].choices[0].text)
    assert out[1].choices[0].text in {"yes", "no", "maybe"}
    # a row without grammar in the same batch is sampled as if alone
    alone = llm.generate(["Code:"], free)[0].choices[0].token_ids
    assert out[2].choices[0].token_ids == alone
    assert_no_leaks(llm)


def test_compile_cache_is_keyed_by_schema(llm):
    comp = llm.engine.grammars
    before = comp.num_compiled
    spec = json_spec({"type": "object", "properties": {"k": {"type": "boolean"}}})
    for _ in range(3):
        llm.generate(["x"], SamplingParams(temperature=0, max_tokens=30, structured=spec))
    assert comp.num_compiled == before + 1


@pytest.mark.parametrize(
    "spec",
    [
        GrammarSpec("json", '{"type": "bogus"}', "response_format"),
        GrammarSpec("json", "[1, 2]", "response_format"),
        GrammarSpec("regex", "a(b", "structured_outputs"),
        GrammarSpec("choice", "[]", "structured_outputs"),
        GrammarSpec("grammar", "start: undefined_rule", "structured_outputs"),
    ],
)
def test_invalid_constraints_are_invalid_request(llm, spec):
    with pytest.raises(InvalidRequestError) as e:
        llm.engine.add_request(EngineRequest("bad", [1, 2], SamplingParams(structured=spec)))
    assert e.value.param == spec.param
    assert_no_leaks(llm)


def test_logit_bias_forces_a_token_and_is_range_checked(llm):
    tok = llm.tokenizer.encode(" the")[0]
    p = SamplingParams(temperature=1.0, seed=3, max_tokens=5, logit_bias={tok: 100.0})
    assert llm.generate(["Hello"], p)[0].choices[0].token_ids == [tok] * 5
    with pytest.raises(InvalidRequestError) as e:
        llm.engine.add_request(EngineRequest("b", [1, 2], SamplingParams(logit_bias={10**6: 1.0})))
    assert e.value.param == "logit_bias"
    with pytest.raises(InvalidRequestError):
        SamplingParams(logit_bias={5: 101.0})


def test_preemption_keeps_matchers_consistent(qwen3_tiny):
    # 12 blocks of 16 tokens, 3 long-running sequences: the scheduler must preempt.
    small = LLM(str(qwen3_tiny), num_kv_blocks=12, block_size=16, max_model_len=192)
    spec = GrammarSpec("regex", "[0-9]{90}")  # at least 45 tokens each, 3 of them
    p = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=100, structured=spec)
    out = small.generate(["Numbers: " * 6], p)[0]
    assert small.engine.stats().num_preemptions > 0
    for c in out.choices:
        assert c.finish_reason == "stop" and re.fullmatch("[0-9]{90}", c.text), c.text
    assert_no_leaks(small)


def test_abort_releases_blocks(llm):
    p = SamplingParams(temperature=1.0, max_tokens=100, structured=json_spec(SCHEMA))
    llm.engine.add_request(EngineRequest("ab", llm.processor.encode("Hello there"), p))
    llm.engine.step()
    llm.engine.step()
    assert llm.engine.abort_request("ab")
    assert not llm.engine.abort_request("ab")  # gone: nothing left to abort
    assert_no_leaks(llm)


def test_prompt_logprobs_match_a_full_forward(llm):
    prompt = "The river bends and the water runs"
    p = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2)
    eng = llm.engine
    ids = llm.processor.encode(prompt)
    eng.add_request(EngineRequest("plp", ids, p))
    first = None
    while eng.has_unfinished_requests():
        for out in eng.step():
            first = first or out
    plp = first.prompt_logprobs
    assert plp[0] is None and len(plp) == len(ids)
    assert [lp.token_id for lp in plp[1:]] == ids[1:]
    assert all(len(lp.top) == 2 and lp.logprob <= 0 for lp in plp[1:])
    # the greedy continuation of prompt[:k] is the top-1 of prompt logprob k
    k = 4
    nxt = llm.generate([ids[:k]], SamplingParams(temperature=0, max_tokens=1))
    assert plp[k].top[0][0] == nxt[0].choices[0].token_ids[0]
    assert_no_leaks(llm)


def test_prompt_logprobs_are_the_same_with_chunked_prefill(llm, qwen3_tiny):
    chunked = LLM(
        str(qwen3_tiny),
        num_kv_blocks=128,
        block_size=4,
        max_model_len=256,
        max_num_batched_tokens=8,
    )
    prompt = "Once upon a time there was a river that bent around the old mill"
    p = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)

    def plp(engine_llm: LLM) -> list:
        eng = engine_llm.engine
        eng.add_request(EngineRequest("c", engine_llm.processor.encode(prompt), p))
        outs = []
        while eng.has_unfinished_requests():
            outs += eng.step()
        return outs[0].prompt_logprobs

    a, b = plp(llm), plp(chunked)
    assert len(a) == len(b) > 9  # several 8-token chunks
    assert [x.token_id for x in a[1:]] == [x.token_id for x in b[1:]]
    assert all(abs(x.logprob - y.logprob) < 1e-4 for x, y in zip(a[1:], b[1:], strict=True))
    assert_no_leaks(chunked)
