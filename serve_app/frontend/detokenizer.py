"""Incremental detokenization with stop strings, one instance per generated sequence (choice).

Follows vLLM v1: a fast path on `tokenizers.decoders.DecodeStream`, a windowed-decode fallback
for slow tokenizers, and stop strings checked on the tail of the text only. While streaming,
the last (longest stop string - 1) characters are held back, so a stop string that is about to
match is never half-sent and then retracted.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from serve_app.engine.request import SamplingParams

logger = logging.getLogger(__name__)

_REPLACEMENT_CHAR = "\ufffd"
_INVALID_PREFIX_ERR = "Invalid prefix encountered"
# Prompt tokens used to give the first output token its context (leading spaces, merges).
_MIN_PROMPT_CONTEXT = 4
_MAX_PROMPT_CONTEXT = 24
_WINDOW_PROMPT_CONTEXT = 5  # HF / TGI / vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET


class _TokenDecoder(Protocol):
    def step(self, token_id: int) -> str:
        """Returns the text that `token_id` completes ("" while a character is incomplete)."""
        ...


class _StreamDecoder:
    """Fast path: the Rust DecodeStream buffers bytes until they form whole UTF-8 characters."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool, prompt_ids: list[int]):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        # Prime with the prompt's tail, stepping like vLLM (DecodeStream's `ids=` argument is
        # missing from older tokenizers releases).
        for token_id in _prompt_context(tokenizer, prompt_ids):
            self.step(token_id)

    def step(self, token_id: int) -> str:
        try:
            return self._stream.step(self._tokenizer, token_id) or ""
        except Exception as e:
            if not str(e).startswith(_INVALID_PREFIX_ERR):
                raise
            # Some tokenizers decode non-monotonically (vLLM issue 17448), which breaks the
            # stream's prefix bookkeeping; restart without context rather than fail the request.
            logger.warning("DecodeStream lost its prefix; restarting it without context")
            self._stream = DecodeStream(skip_special_tokens=self._skip)
            return self._stream.step(self._tokenizer, token_id) or ""


def _prompt_context(tokenizer: Tokenizer, prompt_ids: list[int]) -> list[int]:
    """The shortest prompt suffix (>= 4 tokens) that does not start mid-character."""
    if len(prompt_ids) <= _MIN_PROMPT_CONTEXT:
        return list(prompt_ids)
    for n in range(_MIN_PROMPT_CONTEXT, min(len(prompt_ids), _MAX_PROMPT_CONTEXT) + 1):
        suffix = prompt_ids[-n:]
        if _REPLACEMENT_CHAR not in tokenizer.decode(suffix, skip_special_tokens=False):
            return list(suffix)
    return list(prompt_ids[-_MIN_PROMPT_CONTEXT:])


class _WindowDecoder:
    """Fallback for slow tokenizers: decode a short window and diff it against its prefix.

    ids[prefix_offset:read_offset] is text already emitted, kept as context; a token's text is
    released only once the window decodes without a trailing U+FFFD (an incomplete character).
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool, prompt_ids: list[int]):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids = list(prompt_ids[-_WINDOW_PROMPT_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        # A prompt that ends mid-character: leave its partial bytes unread, so the output token
        # that completes the character releases it (as DecodeStream does).
        while self._read_offset and self._decode(self._ids[: self._read_offset]).endswith(
            _REPLACEMENT_CHAR
        ):
            self._read_offset -= 1

    def step(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        # Drop ids that no window will need again so the list stays short.
        del self._ids[: self._read_offset]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        return new_text[len(prefix_text) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)


def _rust_tokenizer(tokenizer: Any) -> Tokenizer | None:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    inner = getattr(tokenizer, "_tokenizer", None)  # PreTrainedTokenizerFast's backend
    return inner if isinstance(inner, Tokenizer) else None


class IncrementalDetokenizer:
    """Turns one sequence's output tokens into text and checks its stop strings.

    Per engine output the front end calls `update(new_ids)`, then `get_delta()` for the text
    to stream. When the sequence ends for any reason other than a stop string (eos / stop
    token, length, abort), it calls `finish()` so the held-back tail is released by
    `get_delta()`. A matched stop string finishes the detokenizer by itself; the front end
    must then abort the sequence in the engine and end the choice (finish_reason "stop",
    stop_reason = the returned string).
    Invariant: the concatenation of all deltas equals `output_text` once finished.
    """

    def __init__(self, tokenizer: Any, params: SamplingParams, prompt_token_ids: list[int]):
        rust = _rust_tokenizer(tokenizer)
        skip = params.skip_special_tokens
        self._decoder: _TokenDecoder = (
            _StreamDecoder(rust, skip, prompt_token_ids)
            if rust is not None
            else _WindowDecoder(tokenizer, skip, prompt_token_ids)
        )
        self._stop = params.stop
        self._include_stop = params.include_stop_str_in_output
        self._min_tokens = params.min_tokens
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        # With the stop string kept in the output, a partial match already sent is still a
        # prefix of the final text, so nothing needs holding back (same as vLLM).
        self._hold_back = self._max_stop_len - 1 if self._stop and not self._include_stop else 0
        self._text = ""
        self._sent = 0  # chars of _text already returned by get_delta()
        self._num_tokens = 0
        self._finished = False
        self._stop_str: str | None = None

    @property
    def output_text(self) -> str:
        """All text so far, including the part held back from streaming."""
        return self._text

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def stop_str(self) -> str | None:
        """The stop string that ended the sequence, if any."""
        return self._stop_str

    def update(self, new_token_ids: list[int], stop_terminated: bool = False) -> str | None:
        """Appends tokens; returns the stop string that matched, else None.

        stop_terminated: the last id is the eos / stop token id that ended the sequence. Its
        text is left out unless include_stop_str_in_output (vLLM v1), and the detokenizer
        finishes, as if `finish()` had been called.
        """
        if self._finished:
            raise RuntimeError("update() after the detokenizer finished")
        ids = new_token_ids
        if stop_terminated and ids and not self._include_stop:
            ids = ids[:-1]
        # Stop strings are not looked for in the text of the first min_tokens tokens (vLLM).
        check_from = len(self._text)
        for token_id in ids:
            self._num_tokens += 1
            self._text += self._decoder.step(token_id)
            if self._num_tokens <= self._min_tokens:
                check_from = len(self._text)
        if stop_terminated:
            self._finished = True
        if not self._stop or len(self._text) == check_from:
            return None
        match = self._find_stop(check_from)
        if match is None:
            return None
        stop_str, index = match
        end = index + len(stop_str) if self._include_stop else index
        self._text = self._text[:end]
        self._stop_str = stop_str
        self._finished = True
        return stop_str

    def _find_stop(self, check_from: int) -> tuple[str, int] | None:
        """Earliest stop string that ends in the new text (past check_from); only the tail is
        searched, since anything ending earlier was already ruled out on an earlier step."""
        best: tuple[str, int] | None = None
        for stop_str in self._stop:
            index = self._text.find(stop_str, max(0, check_from - len(stop_str) + 1))
            if index != -1 and (best is None or index < best[1]):
                best = (stop_str, index)
        return best

    def finish(self) -> None:
        """Marks the sequence done, so the next get_delta() releases the held-back tail."""
        self._finished = True

    def get_delta(self) -> str:
        """Text not yet returned, minus the held-back tail while the sequence is running."""
        end = len(self._text) if self._finished else len(self._text) - self._hold_back
        if end <= self._sent:
            return ""
        delta = self._text[self._sent : end]
        self._sent = end
        return delta
