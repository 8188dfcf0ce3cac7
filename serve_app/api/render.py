"""Engine outputs -> OpenAI response bodies and stream chunks, for completions and chat.

A request with P prompts and n choices each has choice index = prompt_index * n + choice.
"""

from __future__ import annotations

import time
from typing import Any

from serve_app.api.tools import ToolCallParser, merge_tool_deltas
from serve_app.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob


class Renderer:
    object_final = ""
    object_chunk = ""

    def __init__(self, request_id: str, model: str, tokenizer: Any, n: int):
        self.id, self.model, self.tokenizer, self.n = request_id, model, tokenizer, n
        self.created = int(time.time())
        self.prompt_tokens: dict[int, int] = {}
        # per prompt: its tokens taken from the prefix cache (local or Redis), as its first
        # output says (with n > 1, the first choice's: the prompt is counted once)
        self.cached_tokens: dict[int, int] = {}
        self.completion_tokens = 0
        self.texts: dict[int, str] = {}
        self.finish: dict[int, tuple[str | None, Any]] = {}
        self.lps: dict[int, list[TokenLogprob]] = {}
        self._started: set[int] = set()

    # -- shared bookkeeping ------------------------------------------------------------------

    def _track(self, i: int, out: RequestOutput) -> list[tuple[int, CompletionOutput]]:
        self.prompt_tokens[i] = len(out.prompt_token_ids)
        self.cached_tokens.setdefault(i, out.num_cached_tokens)
        items = []
        for c in out.outputs:
            idx = i * self.n + c.index
            self.completion_tokens += len(c.token_ids)
            items.append((idx, c))
        return items

    def usage(self) -> dict:
        prompt = sum(self.prompt_tokens.values())
        return {
            "prompt_tokens": prompt,
            "completion_tokens": self.completion_tokens,
            "total_tokens": prompt + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": sum(self.cached_tokens.values())},
        }

    def usage_chunk(self) -> dict:
        return self._envelope(self.object_chunk, [], usage=self.usage())

    def _envelope(self, obj: str, choices: list, **extra) -> dict:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def _token_str(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def accumulate(self, i: int, out: RequestOutput) -> None:
        for idx, c in self._track(i, out):
            self.texts[idx] = self.texts.get(idx, "") + c.text
            self.lps.setdefault(idx, []).extend(c.logprobs or ())
            if c.finish_reason is not None:
                self.finish[idx] = (c.finish_reason, c.stop_reason)

    def final(self) -> dict:
        choices = [self._final_choice(idx) for idx in sorted(self.texts)]
        return self._envelope(self.object_final, choices, usage=self.usage())

    def chunks(self, i: int, out: RequestOutput) -> list[dict]:
        result = []
        for idx, c in self._track(i, out):
            if not c.text and c.finish_reason is None and not c.logprobs:
                continue  # nothing visible yet (e.g. held back for a stop string)
            result.append(self._envelope(self.object_chunk, [self._chunk_choice(idx, c)]))
        return result

    def _final_choice(self, idx: int) -> dict: ...

    def _chunk_choice(self, idx: int, c: CompletionOutput) -> dict: ...


class Completion(Renderer):
    """echo=True puts the prompt (text, and its logprobs when asked) before each choice's
    output, as lm-eval-harness' loglikelihood requests expect. prompt_only (echo with
    max_tokens 0) leaves the one token the engine sampled out: the prompt alone is scored."""

    object_final = object_chunk = "text_completion"

    def __init__(
        self,
        request_id: str,
        model: str,
        tokenizer: Any,
        n: int,
        echo: bool = False,
        prompt_only: bool = False,
    ):
        super().__init__(request_id, model, tokenizer, n)
        self.echo = echo or prompt_only
        self.prompt_only = prompt_only
        self._echoed: set[int] = set()
        self._prompt_lps: dict[int, list] = {}  # prompt index -> its prompt logprobs

    def _echo(self, i: int, out: RequestOutput, c: CompletionOutput) -> CompletionOutput:
        """The first output of a choice, with the prompt put in front when echoing."""
        idx = i * self.n + c.index
        if idx in self._echoed:
            return c
        self._echoed.add(idx)
        prompt = self.tokenizer.decode(out.prompt_token_ids)
        lps = c.logprobs
        prompt_lps = self._prompt_lps.get(i)
        if lps is not None and prompt_lps is not None:
            first = out.prompt_token_ids[0]
            lps = [lp or TokenLogprob(first, None) for lp in prompt_lps] + lps
        return CompletionOutput(
            c.index, prompt + c.text, c.token_ids, lps, c.finish_reason, c.stop_reason
        )

    def accumulate(self, i: int, out: RequestOutput) -> None:
        super().accumulate(i, self._echoed_output(i, out))

    def chunks(self, i: int, out: RequestOutput) -> list[dict]:
        return super().chunks(i, self._echoed_output(i, out))

    def _echoed_output(self, i: int, out: RequestOutput) -> RequestOutput:
        if not self.echo:
            return out
        if out.prompt_logprobs is not None:
            self._prompt_lps[i] = out.prompt_logprobs
        outs = out.outputs
        if self.prompt_only:
            outs = [_without_completion(c) for c in outs]
        outs = [self._echo(i, out, c) for c in outs]
        return RequestOutput(
            out.request_id, out.prompt_token_ids, outs, out.finished, out.num_cached_tokens
        )

    def _logprobs(self, lps: list[TokenLogprob] | None, offset: int = 0) -> dict | None:
        if not lps:
            return None
        tokens = [self._token_str(lp.token_id) for lp in lps]
        offsets, pos = [], offset
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [
                {self._token_str(t): v for t, v in lp.top} if lp.logprob is not None else None
                for lp in lps
            ],
            "text_offset": offsets,
        }

    def _final_choice(self, idx: int) -> dict:
        reason, stop = self.finish.get(idx, (None, None))
        return {
            "index": idx,
            "text": self.texts[idx],
            "logprobs": self._logprobs(self.lps[idx]),
            "finish_reason": reason,
            "stop_reason": stop,
        }

    def _chunk_choice(self, idx: int, c: CompletionOutput) -> dict:
        return {
            "index": idx,
            "text": c.text,
            "logprobs": self._logprobs(c.logprobs),
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        }


class Chat(Renderer):
    object_final = "chat.completion"
    object_chunk = "chat.completion.chunk"

    def _logprobs(self, lps: list[TokenLogprob] | None) -> dict | None:
        if not lps:
            return None

        def entry(token_id: int, logprob: float) -> dict:
            s = self._token_str(token_id)
            return {"token": s, "logprob": logprob, "bytes": list(s.encode())}

        return {
            "content": [
                {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                for lp in lps
            ]
        }

    def __init__(
        self,
        request_id: str,
        model: str,
        tokenizer: Any,
        n: int,
        tool_calls: bool = False,
        calls_finish: str = "tool_calls",
    ):
        super().__init__(request_id, model, tokenizer, n)
        self.parse_tools = tool_calls  # parse <tool_call> output into tool_calls
        self.calls_finish = calls_finish  # a choice's finish_reason when it called tools
        self._parsers: dict[int, ToolCallParser] = {}
        self.calls: dict[int, list[dict]] = {}

    def _split(self, idx: int, c: CompletionOutput) -> tuple[str, list[dict]]:
        """(content, tool-call deltas) of one output delta; flushed when the choice ends."""
        if not self.parse_tools:
            return c.text, []
        parser = self._parsers.setdefault(idx, ToolCallParser())
        content, calls = parser.feed(c.text)
        if c.finish_reason is not None:
            more, last = parser.finish()
            content, calls = content + more, calls + last
        return content, calls

    def _reason(self, idx: int, reason: str | None) -> str | None:
        parser = self._parsers.get(idx)
        if reason == "stop" and parser is not None and parser.num_calls:
            return self.calls_finish
        return reason

    def accumulate(self, i: int, out: RequestOutput) -> None:
        if not self.parse_tools:
            return super().accumulate(i, out)
        for idx, c in self._track(i, out):
            content, calls = self._split(idx, c)
            self.texts[idx] = self.texts.get(idx, "") + content
            self.calls.setdefault(idx, []).extend(calls)
            self.lps.setdefault(idx, []).extend(c.logprobs or ())
            if c.finish_reason is not None:
                self.finish[idx] = (c.finish_reason, c.stop_reason)

    def _final_choice(self, idx: int) -> dict:
        reason, stop = self.finish.get(idx, (None, None))
        message: dict = {"role": "assistant", "content": self.texts[idx]}
        calls = merge_tool_deltas(self.calls.get(idx, []))
        if calls:
            message["content"] = self.texts[idx] or None
            message["tool_calls"] = calls
        return {
            "index": idx,
            "message": message,
            "logprobs": self._logprobs(self.lps[idx]),
            "finish_reason": self._reason(idx, reason),
            "stop_reason": stop,
        }

    def chunks(self, i: int, out: RequestOutput) -> list[dict]:
        if not self.parse_tools:
            return super().chunks(i, out)
        result = []
        for idx, c in self._track(i, out):
            content, calls = self._split(idx, c)
            if not content and not calls and c.finish_reason is None and not c.logprobs:
                continue
            delta: dict = {}
            if content or not calls:
                delta["content"] = content
            if calls:
                delta["tool_calls"] = calls
            choice = self._delta_choice(idx, c, delta)
            result.append(self._envelope(self.object_chunk, [choice]))
        return result

    def _chunk_choice(self, idx: int, c: CompletionOutput) -> dict:
        return self._delta_choice(idx, c, {"content": c.text})

    def _delta_choice(self, idx: int, c: CompletionOutput, delta: dict) -> dict:
        if idx not in self._started:
            self._started.add(idx)
            delta["role"] = "assistant"
        return {
            "index": idx,
            "delta": delta,
            "logprobs": self._logprobs(c.logprobs),
            "finish_reason": self._reason(idx, c.finish_reason),
            "stop_reason": c.stop_reason,
        }


def _without_completion(c: CompletionOutput) -> CompletionOutput:
    """A choice with its generated tokens left out (echo with max_tokens 0): finished by
    length, as OpenAI answers a request for no tokens."""
    lps = [] if c.logprobs is not None else None
    return CompletionOutput(c.index, "", [], lps, "length" if c.finish_reason else None)
