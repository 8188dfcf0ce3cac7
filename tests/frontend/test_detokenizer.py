"""Incremental detokenization and stop strings on a tiny byte-level BPE trained in-process."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from serve_app.engine.request import SamplingParams
from serve_app.frontend.detokenizer import IncrementalDetokenizer

CORPUS = [
    "hello world, the quick brown fox jumps over the lazy dog.",
    "café 東京 🙂 naïve façade über straße",
    "stop here. STOP there! the end of the story",
]
TEXT = "hello world: café 東京 🙂 the end"


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,  # few merges, so rare multi-byte characters stay split across tokens
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


class SlowTokenizer:
    """Hides the Rust backend, forcing the windowed-decode fallback."""

    def __init__(self, fast: PreTrainedTokenizerFast):
        self._fast = fast

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._fast.decode(ids, skip_special_tokens=skip_special_tokens)


def byte_ids(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """One token per UTF-8 byte: every multi-byte character is split across tokens."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_to_char = {b: chr(c) for b, c in zip(bs, cs, strict=True)}
    return tokenizer.convert_tokens_to_ids([byte_to_char[b] for b in text.encode()])


def stream(
    detok: IncrementalDetokenizer, ids: list[int], chunk: int = 1
) -> tuple[list[str], str | None]:
    """Feeds ids `chunk` at a time; returns every delta (the last one after finish)."""
    deltas: list[str] = []
    matched = None
    for i in range(0, len(ids), chunk):
        matched = detok.update(ids[i : i + chunk])
        deltas.append(detok.get_delta())
        if matched is not None:
            break
    detok.finish()
    deltas.append(detok.get_delta())
    return deltas, matched


@pytest.fixture(params=["fast", "slow"])
def make(request, tokenizer):
    def make(
        params: SamplingParams | None = None, prompt: str | list[int] = "Q:"
    ) -> IncrementalDetokenizer:
        tok = tokenizer if request.param == "fast" else SlowTokenizer(tokenizer)
        prompt_ids = tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        return IncrementalDetokenizer(tok, params or SamplingParams(), prompt_ids)

    return make


def test_multibyte_chars_are_split_by_the_fixture(tokenizer) -> None:
    ids = tokenizer.encode(TEXT)
    pieces = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces), "the test needs characters split across tokens"


@pytest.mark.parametrize("split", ["bpe", "bytes"])
@pytest.mark.parametrize("chunk", [1, 3])
def test_deltas_concatenate_to_full_decode(make, tokenizer, split: str, chunk: int) -> None:
    ids = tokenizer.encode(TEXT) if split == "bpe" else byte_ids(tokenizer, TEXT)
    assert tokenizer.decode(ids) == TEXT
    detok = make()
    deltas, matched = stream(detok, ids, chunk)
    assert matched is None
    assert "".join(deltas) == detok.output_text == TEXT
    assert not any("\ufffd" in d for d in deltas)


def test_first_token_keeps_its_leading_space(make, tokenizer) -> None:
    detok = make(prompt="hello")
    deltas, _ = stream(detok, tokenizer.encode(" world"))
    assert "".join(deltas) == " world"


def test_prompt_ending_mid_character(make, tokenizer) -> None:
    ids = byte_ids(tokenizer, "ab東京")
    cut = len(byte_ids(tokenizer, "ab")) + 2  # inside the 3 bytes of 東
    detok = make(prompt=ids[:cut])
    assert "".join(stream(detok, ids[cut:])[0]) == "東京"


def test_special_tokens(make, tokenizer) -> None:
    ids = tokenizer.encode("the end") + [tokenizer.eos_token_id]
    skipped = make()
    assert "".join(stream(skipped, ids)[0]) == "the end"
    kept = make(SamplingParams(skip_special_tokens=False))
    assert "".join(stream(kept, ids)[0]) == "the end<eos>"


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens(make, tokenizer, include: bool) -> None:
    stop = "é 東"  # spans tokens, and starts and ends inside split multi-byte characters
    detok = make(SamplingParams(stop=["never", stop], include_stop_str_in_output=include))
    ids = byte_ids(tokenizer, TEXT)
    deltas, matched = stream(detok, ids)
    expected = TEXT[: TEXT.index(stop) + (len(stop) if include else 0)]
    assert matched == stop == detok.stop_str
    assert detok.finished
    assert detok.output_text == expected == "".join(deltas)


def test_stop_string_never_leaks_partially(make, tokenizer) -> None:
    stop = "the end"
    detok = make(SamplingParams(stop=[stop]))
    sent = ""
    for token_id in byte_ids(tokenizer, TEXT):
        matched = detok.update([token_id])
        sent += detok.get_delta()
        # What was streamed is always a prefix of the final text, never a retracted piece.
        assert TEXT[: TEXT.index(stop)].startswith(sent)
        if matched:
            break
    assert matched == stop
    detok.finish()
    sent += detok.get_delta()
    assert sent == detok.output_text == TEXT[: TEXT.index(stop)]


def test_held_back_tail_flushed_on_finish(make, tokenizer) -> None:
    detok = make(SamplingParams(stop=["xyz"]))  # holds back 2 chars, never matches
    for token_id in tokenizer.encode(TEXT):
        assert detok.update([token_id]) is None
    streamed = ""
    streamed += detok.get_delta()
    assert streamed == TEXT[:-2]
    assert detok.get_delta() == ""
    detok.finish()
    assert detok.get_delta() == TEXT[-2:]
    assert detok.get_delta() == ""
    assert detok.output_text == TEXT


def test_earliest_stop_string_wins(make, tokenizer) -> None:
    detok = make(SamplingParams(stop=["end", "world"]))
    deltas, matched = stream(detok, tokenizer.encode(TEXT), chunk=len(TEXT))  # one update
    assert matched == "world"
    assert "".join(deltas) == "hello "


def test_stop_string_ignored_during_min_tokens(make, tokenizer) -> None:
    ids = tokenizer.encode("hello hello world")
    first = len(tokenizer.encode("hello"))
    detok = make(SamplingParams(stop=["hello"], min_tokens=first))
    deltas, matched = stream(detok, ids)
    assert matched == "hello"
    assert "".join(deltas) == "hello "


def test_stop_terminated_token_text(make, tokenizer) -> None:
    stop_id = tokenizer.encode("!")[0]
    ids = tokenizer.encode("the end") + [stop_id]
    excluded = make(SamplingParams(stop_token_ids=[stop_id]))
    assert excluded.update(ids, stop_terminated=True) is None
    assert excluded.finished and excluded.get_delta() == "the end"

    included = make(SamplingParams(stop_token_ids=[stop_id], include_stop_str_in_output=True))
    included.update(ids, stop_terminated=True)
    assert included.get_delta() == "the end!"


def test_update_after_finish_raises(make, tokenizer) -> None:
    detok = make()
    detok.update(tokenizer.encode("hi"))
    detok.finish()
    with pytest.raises(RuntimeError):
        detok.update(tokenizer.encode("more"))
