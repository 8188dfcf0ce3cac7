"""The front end's OutputProcessor on the tiny checkpoint's tokenizer, fed EngineOutputs by
hand: no engine, no threads."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from serve_app.engine.errors import InvalidRequestError
from serve_app.engine.outputs import EngineOutput, TokenLogprob
from serve_app.engine.request import SamplingParams
from serve_app.frontend.output_processor import OutputProcessor

TEXT = " the river bends and the water runs"


@pytest.fixture(scope="module")
def processor(qwen3_tiny) -> OutputProcessor:
    return OutputProcessor(AutoTokenizer.from_pretrained(qwen3_tiny))


def test_fan_out_gives_n_sequences_with_offset_seeds(processor):
    ids = processor.encode("Hello")
    state = processor.new_request("r", ids, SamplingParams(n=3, seed=10, max_tokens=4))
    assert [r.request_id for r in state.requests] == ["r#0", "r#1", "r#2"]
    assert [r.params.seed for r in state.requests] == [10, 11, 12]
    assert all(r.params.n == 1 and r.prompt_token_ids == ids for r in state.requests)
    one = processor.new_request("s", ids, SamplingParams(max_tokens=4))
    assert [r.request_id for r in one.requests] == ["s"]
    with pytest.raises(InvalidRequestError):
        processor.encode("")


def test_a_stop_string_inside_a_coalesced_output_ends_the_choice_at_its_token(processor):
    """Several steps' tokens at once: the choice ends at the token that completed the stop
    string, what the engine made after it is dropped, and the sequence is named for abort."""
    out_ids = processor.tokenizer.encode(TEXT, add_special_tokens=False)
    state = processor.new_request("r", [1, 2], SamplingParams(stop=["river"], max_tokens=50))
    lps = [TokenLogprob(t, -1.0) for t in out_ids]
    ro = state.process([EngineOutput("r", out_ids, lps)])
    (c,) = ro.outputs
    assert (c.text, c.finish_reason, c.stop_reason) == (" the ", "stop", "river")
    assert processor.tokenizer.decode(c.token_ids).endswith("river")
    assert len(c.token_ids) < len(out_ids) and len(c.logprobs) == len(c.token_ids)
    assert ro.finished and state.take_aborts() == ["r"] and state.take_aborts() == []
    assert state.process([EngineOutput("r", out_ids[:1])]) is None  # the engine ran ahead


def test_n_choices_merge_and_the_stop_token_text_is_left_out(processor):
    eos = processor.tokenizer.eos_token_id or 0
    a = processor.tokenizer.encode(" yes", add_special_tokens=False)
    b = processor.tokenizer.encode(" no", add_special_tokens=False)
    state = processor.new_request("r", [1, 2], SamplingParams(n=2, max_tokens=8))
    first = state.process([EngineOutput("r#1", b), EngineOutput("r#0", a)])
    assert [c.index for c in first.outputs] == [0, 1] and not first.finished
    done0 = state.process([EngineOutput("r#0", [eos], None, "stop", None, True)])
    assert done0.outputs[0].finish_reason == "stop" and not done0.finished
    assert done0.outputs[0].text == ""  # the eos token's text is not output
    done1 = state.process([EngineOutput("r#1", b[:1], None, "length")])
    assert done1.finished and done1.outputs[0].finish_reason == "length"
    assert state.take_aborts() == []  # the engine finished both itself
