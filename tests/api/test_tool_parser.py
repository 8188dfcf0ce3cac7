"""The Hermes/Qwen tool-call parser and the tool-aware ChatML template, without a model."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from serve_app.api.tools import ToolCallParser, call_prefix, merge_tool_deltas, tool_call_grammar
from serve_app.tools.tokenizer import CHAT_TEMPLATE

TEXT = (
    "Let me check.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city":"Paris","opts":{"a":1}}}\n'
    "</tool_call>\n"
    '<tool_call>\n{"arguments": {"x": 1}, "name": "f2"}\n</tool_call>'
)


def run(text: str, step: int) -> tuple[str, list[dict]]:
    p = ToolCallParser()
    content, deltas = "", []
    for i in range(0, len(text), step):
        c, d = p.feed(text[i : i + step])
        content, deltas = content + c, deltas + d
    c, d = p.finish()
    return content + c, deltas + d


@pytest.mark.parametrize("step", [1, 2, 5, 13, len(TEXT)])
def test_any_chunking_gives_the_same_calls(step):
    content, deltas = run(TEXT, step)
    assert content == "Let me check.\n"
    calls = merge_tool_deltas(deltas)
    assert [c["function"]["name"] for c in calls] == ["get_weather", "f2"]
    assert calls[0]["function"]["arguments"] == '{"city":"Paris","opts":{"a":1}}'
    assert json.loads(calls[1]["function"]["arguments"]) == {"x": 1}
    # id and name only in the first delta of each call
    firsts = [d for d in deltas if "id" in d]
    assert [d["index"] for d in firsts] == [0, 1]
    assert all("name" not in d["function"] for d in deltas if "id" not in d)


def test_plain_text_and_broken_calls_stay_content():
    assert run("no calls < here <tool", 3) == ("no calls < here <tool", [])
    text = "<tool_call>not json</tool_call> tail"
    assert run(text, 4) == (text, [])


def test_unclosed_call_keeps_raw_arguments():
    content, deltas = run('<tool_call>\n{"name": "f", "arguments": {"a": 1', 3)
    calls = merge_tool_deltas(deltas)
    assert content == "" and calls[0]["function"]["name"] == "f"
    assert calls[0]["function"]["arguments"].startswith('{"a": 1')


@pytest.mark.parametrize("cut", ["}", "}\n", "}\n<", "}\n</tool_call"])
@pytest.mark.parametrize("step", [1, 4, 100])
def test_call_cut_inside_its_closing_tag_has_valid_arguments(cut, step):
    # max_tokens can end the output after the call's JSON but before "</tool_call>" is whole
    # (the grammar forces it token by token): the wrapper's '}' and the partial tag are no
    # part of the arguments, streamed or not.
    content, deltas = run('<tool_call>\n{"name": "W", "arguments": {"city":"Paris"}' + cut, step)
    calls = merge_tool_deltas(deltas)
    assert content == "" and [c["function"]["name"] for c in calls] == ["W"]
    assert calls[0]["function"]["arguments"] == '{"city":"Paris"}'


def test_grammar_text_names_every_tool():
    spec = tool_call_grammar([("a", {"type": "object"}), ("b_2", {"type": "object"})], True)
    assert spec.kind == "grammar" and spec.param == "tool_choice"
    assert json.dumps(call_prefix("b_2")) in spec.value and "%json" in spec.value


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {c: i for i, c in enumerate("abc")}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, "a")))
    tok.chat_template = CHAT_TEMPLATE
    return tok


def test_template_without_tools_is_plain_chatml():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    text = _tokenizer().apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nu<|im_end|>\n" + (
        "<|im_start|>assistant\n"
    )


def test_template_renders_tools_calls_and_results_like_qwen():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    msgs = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "u"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
            ],
        },
        {"role": "tool", "content": "r1"},
        {"role": "tool", "content": "r2"},
    ]
    text = _tokenizer().apply_chat_template(msgs, tools=tools, tokenize=False)
    assert text.startswith("<|im_start|>system\nsys\n\n# Tools\n")
    assert '<tools>\n{"type": "function", "function": {"name": "f"' in text
    assert text.count("<|im_start|>system") == 1
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n'
        "</tool_call><|im_end|>\n"
    ) in text
    assert text.endswith(
        "<|im_start|>user\n<tool_response>\nr1\n</tool_response>\n"
        "<tool_response>\nr2\n</tool_response><|im_end|>\n"
    )
