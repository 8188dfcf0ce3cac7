"""OutputProcessor: a request's text work, once, in the front end (vLLM v1's OutputProcessor).

In: a prompt (tokenized here once if it is a string) and its SamplingParams. To the engine: the
request's n sequences as EngineRequests (n > 1 fanned out, seeds offset per sequence). From the
engine: EngineOutputs (token ids, logprob ids, finishes), one step's or several coalesced. Out:
RequestOutputs, the text deltas the API renders, every choice of the request merged under its
id. A stop string is matched here; the sequence is then over for the client, and its id is in
`RequestState.to_abort` for the caller to abort in the engine (which may have run ahead).

Plain Python on the caller's event loop (the ingress's, the in-process server's) or thread
(the offline LLM): no torch, no engine state.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from serve_app.engine.errors import InvalidRequestError
from serve_app.engine.outputs import (
    CompletionOutput,
    EngineOutput,
    EngineRequest,
    LoraRef,
    RequestOutput,
)
from serve_app.engine.request import SamplingParams
from serve_app.frontend.detokenizer import IncrementalDetokenizer


class OutputProcessor:
    """The front end's tokenizer, and the RequestStates it makes."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def encode(self, prompt: str | list[int]) -> list[int]:
        """A prompt's token ids: a string is tokenized (the one time for its request), ids are
        taken as they are (the engine checks them against its vocabulary)."""
        if not prompt:
            raise InvalidRequestError("prompt must not be empty", "prompt")
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        ids = list(prompt)
        # as vLLM's input processor: ids the tokenizer does not know cannot be detokenized
        vocab = len(self.tokenizer)
        bad = [
            t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab
        ]
        if bad:
            raise InvalidRequestError(
                f"prompt contains token ids outside [0, {vocab}): {bad[:5]}", "prompt"
            )
        return ids

    def new_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        lora: LoraRef | None = None,
    ) -> RequestState:
        return RequestState(request_id, prompt_token_ids, params, self.tokenizer, lora)


@dataclasses.dataclass(slots=True)
class _Sequence:
    index: int  # the choice's index in the request
    detok: IncrementalDetokenizer
    done: bool = False


class RequestState:
    """One request in the front end: its engine sequences and their detokenizers."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        tokenizer,
        lora: LoraRef | None = None,
    ):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.requests: list[EngineRequest] = []
        self._seqs: dict[str, _Sequence] = {}
        for i in range(params.n):
            p, rid = params, request_id
            if params.n > 1:  # fan out: sequence i is `<id>#i`, its seed offset by i
                seed = None if params.seed is None else params.seed + i
                p, rid = dataclasses.replace(params, n=1, seed=seed), f"{request_id}#{i}"
            self.requests.append(EngineRequest(rid, prompt_token_ids, p, lora))
            self._seqs[rid] = _Sequence(i, IncrementalDetokenizer(tokenizer, p, prompt_token_ids))
        self._live = params.n
        self._prompt_logprobs_sent = False
        self.to_abort: list[str] = []  # sequences a stop string ended, still running in the engine

    @property
    def finished(self) -> bool:
        return self._live == 0

    def take_aborts(self) -> list[str]:
        ids, self.to_abort = self.to_abort, []
        return ids

    def process(self, outputs: list[EngineOutput]) -> RequestOutput | None:
        """The engine's outputs since the last call, as one increment of every choice that
        advanced (None if none did: e.g. outputs of a sequence a stop string already ended)."""
        choices: dict[int, CompletionOutput] = {}
        prompt_lps, cached = None, None
        for out in outputs:
            seq = self._seqs.get(out.request_id)
            if seq is None or seq.done:
                continue  # the engine ran past a stop string before our abort reached it
            c = choices.get(seq.index)
            if c is None:
                lps = None if out.new_logprobs is None else []
                c = choices[seq.index] = CompletionOutput(seq.index, "", [], lps)
            if cached is None:
                cached = out.num_cached_tokens
            if out.prompt_logprobs is not None and not self._prompt_logprobs_sent:
                prompt_lps = out.prompt_logprobs
            self._add_tokens(out, seq, c)
            if c.finish_reason is not None:
                if not seq.detok.finished:
                    seq.detok.finish()
                seq.done = True
                self._live -= 1
            c.text += seq.detok.get_delta()
        if not choices:
            return None
        ro = RequestOutput(
            self.request_id,
            self.prompt_token_ids,
            [choices[i] for i in sorted(choices)],
            self.finished,
            cached or 0,
        )
        if prompt_lps is not None:
            self._prompt_logprobs_sent = True
            ro.prompt_logprobs = prompt_lps
        return ro

    def _add_tokens(self, out: EngineOutput, seq: _Sequence, c: CompletionOutput) -> None:
        """Token by token (coalesced outputs bring several), so that a stop string ends the
        choice at the token that completed it: what the engine made after it is dropped."""
        last = len(out.new_token_ids) - 1
        for k, token in enumerate(out.new_token_ids):
            stop_str = seq.detok.update([token], out.stop_token and k == last)
            c.token_ids.append(token)
            if out.new_logprobs is not None:
                c.logprobs.append(out.new_logprobs[k])  # type: ignore[union-attr]
            if stop_str is not None and not (out.finish_reason is not None and k == last):
                c.finish_reason, c.stop_reason = "stop", stop_str
                self.to_abort.append(out.request_id)
                return
        if out.finish_reason is not None:
            c.finish_reason, c.stop_reason = out.finish_reason, out.stop_reason
