"""LLM: offline batch generation on top of LLMEngine (all prompts submitted at once).

The engine is token-in/token-out; the text is the front end's OutputProcessor, the same one the
servers use (serve_app/frontend), run here on the caller's thread between steps."""

from __future__ import annotations

from dataclasses import dataclass, field

from serve_app.engine.config import EngineConfig
from serve_app.engine.engine import LLMEngine
from serve_app.engine.outputs import LoraRef, RequestOutput, TokenLogprob
from serve_app.engine.request import SamplingParams
from serve_app.frontend.output_processor import OutputProcessor, RequestState
from serve_app.kvstore.settings import KVStoreConfig
from serve_app.runtime.factory import build_engine


@dataclass(slots=True)
class Choice:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass(slots=True)
class Completion:
    """The whole result of one prompt: its n choices, accumulated from the deltas."""

    request_id: str
    prompt_token_ids: list[int]
    choices: list[Choice]
    num_cached_tokens: int = 0

    def add(self, delta: RequestOutput) -> None:
        self.num_cached_tokens = max(self.num_cached_tokens, delta.num_cached_tokens)
        for out in delta.outputs:
            c = self.choices[out.index]
            c.text += out.text
            c.token_ids.extend(out.token_ids)
            c.logprobs.extend(out.logprobs or ())
            c.finish_reason = out.finish_reason or c.finish_reason
            c.stop_reason = out.stop_reason if out.stop_reason is not None else c.stop_reason


class LLM:
    def __init__(self, model: str, kv_store: KVStoreConfig | None = None, **engine_kwargs):
        """engine_kwargs: EngineConfig's; kv_store: the shared prefix cache (None: off)."""
        self._attach(build_engine(EngineConfig(model=model, **engine_kwargs), kv_store=kv_store))

    @classmethod
    def over(cls, engine: LLMEngine) -> LLM:
        """Offline generation over an engine the caller built (remote experts, say)."""
        llm = cls.__new__(cls)
        llm._attach(engine)
        return llm

    def _attach(self, engine: LLMEngine) -> None:
        from transformers import AutoTokenizer

        self.engine = engine
        self.tokenizer = AutoTokenizer.from_pretrained(engine.config.model)
        self.processor = OutputProcessor(self.tokenizer)

    def generate(
        self,
        prompts: list[str | list[int]],
        params: SamplingParams | list[SamplingParams],
        lora: str | list[str | None] | None = None,
    ) -> list[Completion]:
        """Run every prompt to completion; results come back in input order. lora: the
        adapter (by name) of every prompt, or one per prompt (None: the base model)."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        names = lora if isinstance(lora, list) else [lora] * len(prompts)
        llist = [None if n is None else LoraRef(n) for n in names]  # held by the engine
        results: list[Completion] = []
        states: dict[str, tuple[RequestState, Completion]] = {}  # by sequence id
        for i, (prompt, p, adapter) in enumerate(zip(prompts, plist, llist, strict=True)):
            rid = f"offline-{i}"
            state = self.processor.new_request(rid, self.processor.encode(prompt), p, adapter)
            results.append(Completion(rid, state.prompt_token_ids, [Choice(k) for k in range(p.n)]))
            for req in state.requests:
                self.engine.add_request(req)
                states[req.request_id] = (state, results[-1])
        while self.engine.has_unfinished_requests():
            by_request: dict[str, list] = {}
            for out in self.engine.step():
                by_request.setdefault(states[out.request_id][0].request_id, []).append(out)
            for outs in by_request.values():
                state, completion = states[outs[0].request_id]
                delta = state.process(outs)
                for rid in state.take_aborts():  # a stop string ended it
                    self.engine.abort_request(rid)
                if delta is not None:
                    completion.add(delta)
        return results
