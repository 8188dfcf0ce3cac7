"""Engine outputs -> OpenAI response bodies and stream chunks, for completions and chat.

A request with P prompts and n choices each has choice index = prompt_index * n + choice.
"""

from __future__ import annotations

import time
from typing import Any

from serve_app.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob


class Renderer:
    object_final = ""
    object_chunk = ""

    def __init__(self, request_id: str, model: str, tokenizer: Any, n: int):
        self.id, self.model, self.tokenizer, self.n = request_id, model, tokenizer, n
        self.created = int(time.time())
        self.prompt_tokens: dict[int, int] = {}
        self.completion_tokens = 0
        self.texts: dict[int, str] = {}
        self.finish: dict[int, tuple[str | None, Any]] = {}
        self.lps: dict[int, list[TokenLogprob]] = {}
        self._started: set[int] = set()

    # -- shared bookkeeping ------------------------------------------------------------------

    def _track(self, i: int, out: RequestOutput) -> list[tuple[int, CompletionOutput]]:
        self.prompt_tokens[i] = len(out.prompt_token_ids)
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
    object_final = object_chunk = "text_completion"

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
            "top_logprobs": [{self._token_str(t): v for t, v in lp.top} for lp in lps],
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

    def _final_choice(self, idx: int) -> dict:
        reason, stop = self.finish.get(idx, (None, None))
        return {
            "index": idx,
            "message": {"role": "assistant", "content": self.texts[idx]},
            "logprobs": self._logprobs(self.lps[idx]),
            "finish_reason": reason,
            "stop_reason": stop,
        }

    def _chunk_choice(self, idx: int, c: CompletionOutput) -> dict:
        delta: dict = {"content": c.text}
        if idx not in self._started:
            self._started.add(idx)
            delta["role"] = "assistant"
        return {
            "index": idx,
            "delta": delta,
            "logprobs": self._logprobs(c.logprobs),
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        }
