"""LLMEngine: the synchronous core. step() = schedule, execute, update.

A request with n > 1 is fanned out into n child sequences that share the prompt's KV blocks
through the prefix cache; their outputs are merged back per step under the parent's id.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from serve_app.engine.block_hash import root_hash
from serve_app.engine.detokenizer import IncrementalDetokenizer
from serve_app.engine.errors import EngineOverloadedError, InvalidRequestError
from serve_app.engine.kv_cache_manager import KVCacheManager
from serve_app.engine.outputs import CompletionOutput, RequestOutput
from serve_app.engine.parts import EngineParts
from serve_app.engine.request import Request, RequestStatus, SamplingParams, resolve_max_tokens
from serve_app.engine.scheduler import Scheduler, SchedulerConfig
from serve_app.engine.stats import EngineStats
from serve_app.engine.structured import GrammarCompiler

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """A validated, tokenized request, fanned out into its n child sequences."""

    request_id: str
    prompt_token_ids: list[int]
    children: list[Request]


@dataclass(slots=True)
class _Parent:
    request_id: str
    prompt_token_ids: list[int]
    children: list[Request]
    sent_first: bool = False


@dataclass(slots=True)
class _Child:
    parent: _Parent
    index: int
    detok: IncrementalDetokenizer


class LLMEngine:
    """The loop over a replica's parts (engine/parts.py: model runner, KV pool, connector,
    tokenizer): the block manager, the scheduler and the requests. build_engine
    (serve_app/runtime/factory.py) builds the parts once, with the experts and the connector
    it picks from the config."""

    def __init__(self, parts: EngineParts):
        config = self.config = parts.config
        self.spec = parts.spec
        self.tokenizer = parts.tokenizer
        self.eos_token_ids = parts.eos_token_ids
        self.runner = parts.runner
        self.num_kv_blocks = parts.num_kv_blocks
        self.kv_block_bytes = parts.kv_block_bytes
        self.kv_format = parts.spec.kv_format.tag()
        self.max_model_len = parts.max_model_len
        self.model_digest = parts.model_digest
        self.connector = parts.connector
        self.expert_token_counts = parts.expert_token_counts
        self.kv = KVCacheManager(
            parts.num_kv_blocks,
            config.block_size,
            root_hash(config.prefix_hash_seed, parts.model_digest),
            config.enable_prefix_caching,
            self.connector,
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                config.max_num_seqs,
                config.max_num_batched_tokens,
                self.max_model_len,
                config.enable_chunked_prefill,
            ),
            self.kv,
            self.connector,
        )
        self.scheduler.on_finish = self.runner.sampler.states.release
        self.grammars = GrammarCompiler(self.tokenizer, self.spec.vocab_size, self.eos_token_ids)
        self._parents: dict[str, _Parent] = {}
        self._children: dict[str, _Child] = {}

    # ---- requests ---------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt must not be empty", "prompt")
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        ids = list(prompt)
        if not ids:
            raise InvalidRequestError("prompt must not be empty", "prompt")
        vocab = self.spec.vocab_size
        bad = [
            t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab
        ]
        if bad:
            raise InvalidRequestError(
                f"prompt contains token ids outside [0, {vocab}): {bad[:5]}", "prompt"
            )
        return ids

    def prepare_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> PreparedRequest:
        """Validate and tokenize without touching engine state (safe from any thread)."""
        ids = self.encode_prompt(prompt)
        max_tokens = self._resolve_max_tokens(len(ids), params)
        vocab = self.spec.vocab_size
        bad = [t for t, _ in params.logit_bias if t >= vocab]
        if bad:
            raise InvalidRequestError(
                f"logit_bias has token ids outside [0, {vocab}): {bad[:5]}", "logit_bias"
            )
        children = []
        for i in range(params.n):
            child_params = params
            if params.n > 1 and params.seed is not None:
                child_params = replace(params, seed=params.seed + i, n=1)
            rid = request_id if params.n == 1 else f"{request_id}#{i}"
            req = Request(rid, ids, child_params, self.eos_token_ids, max_tokens)
            if params.structured is not None:  # one matcher per sequence
                req.grammar = self.grammars.matcher(params.structured)
            children.append(req)
        return PreparedRequest(request_id, ids, children)

    def compile_grammar(self, params: SamplingParams):
        """Start compiling the request's grammar on the pool; a future (None: no grammar).
        Awaiting it before prepare_request keeps even the first compile off the caller's
        event loop."""
        return None if params.structured is None else self.grammars.submit(params.structured)

    def add_prepared(self, prepared: PreparedRequest) -> None:
        if prepared.request_id in self._parents:
            raise InvalidRequestError(f"duplicate request id {prepared.request_id!r}", "request_id")
        if self.scheduler.num_waiting >= self.config.max_waiting_requests:
            raise EngineOverloadedError("too many requests waiting; retry later")
        parent = _Parent(prepared.request_id, prepared.prompt_token_ids, prepared.children)
        for i, req in enumerate(prepared.children):
            detok = IncrementalDetokenizer(
                self.tokenizer, req.sampling_params, req.prompt_token_ids
            )
            self._children[req.request_id] = _Child(parent, i, detok)
            self.scheduler.add_request(req)
        self._parents[prepared.request_id] = parent

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> list[int]:
        """Validate and queue a request; returns its prompt token ids."""
        prepared = self.prepare_request(request_id, prompt, params)
        self.add_prepared(prepared)
        return prepared.prompt_token_ids

    def _resolve_max_tokens(self, num_prompt: int, params: SamplingParams) -> int:
        return resolve_max_tokens(num_prompt, params.max_tokens, self.max_model_len)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Abort every unfinished choice of a request; returns its final output."""
        parent = self._parents.pop(request_id, None)
        if parent is None:
            return None
        live = [r.request_id for r in parent.children if not r.is_finished]
        self.scheduler.finish_requests(live, RequestStatus.FINISHED_ABORTED)
        outs = []
        for req in parent.children:
            child = self._children.pop(req.request_id)
            if req.request_id in live:
                outs.append(CompletionOutput(child.index, finish_reason="abort"))
        return RequestOutput(request_id, parent.prompt_token_ids, outs, True)

    def abort_all(self) -> list[str]:
        """Abort every request after a failed step, and forget the prefix cache: that step's
        blocks were published (hashed) at allocation but may hold half-written KV."""
        ids = list(self._parents)
        for rid in ids:
            self.abort_request(rid)
        if self.connector is not None:
            self.connector.discard()  # never send them to the shared cache either
        if not self.kv.reset_prefix_cache():
            log.error("prefix cache not reset: blocks still in use after abort_all")
        return ids

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished

    # ---- the step ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        if sched.external_loads:
            self.connector.load(sched.external_loads)
        block_ids = {r.request_id: self.kv.block_ids(r.request_id) for r in sched.requests}
        result = self.runner.execute(sched, block_ids)
        if self.connector is not None:
            self.connector.save()
        ids = [r.request_id for r in result.requests]
        sampled = dict(zip(ids, result.sampled.token_ids, strict=True))
        logprobs = dict(zip(ids, result.sampled.logprobs, strict=True))
        advanced, _ = self.scheduler.update_from_output(sched, sampled)
        completed = self._advance_grammars(advanced)
        return self._process_outputs(advanced, logprobs, completed)

    def _advance_grammars(self, advanced: list[Request]) -> set[str]:
        """Feed each constrained request its new token; stop it when its grammar is complete.
        Returns the ids stopped that way: their last token is output, not a stop token."""
        completed: set[str] = set()
        for req in advanced:
            g = req.grammar
            if g is None:
                continue
            token = req.output_token_ids[-1]
            ok = g.accept(token)
            if not ok:
                # Only when no allowed token could be sampled (e.g. min_tokens banned eos,
                # the only one left): end the request rather than emit invalid output.
                log.warning("%s: grammar refused token %d: %s", req.request_id, token, g.error)
            if not req.is_finished and (g.is_terminated or not ok):
                self.scheduler.finish_requests([req.request_id], RequestStatus.FINISHED_STOPPED)
                completed.add(req.request_id)
        return completed

    def _process_outputs(
        self, advanced: list[Request], logprobs: dict, completed: set[str]
    ) -> list[RequestOutput]:
        by_parent: dict[str, RequestOutput] = {}
        for req in advanced:
            child = self._children[req.request_id]
            token = req.output_token_ids[-1]
            stop_terminated = (
                req.status == RequestStatus.FINISHED_STOPPED and req.request_id not in completed
            )
            stop_str = child.detok.update([token], stop_terminated)
            if stop_str is not None and not req.is_finished:
                self.scheduler.finish_requests([req.request_id], RequestStatus.FINISHED_STOPPED)
                req.stop_reason = stop_str
            if req.is_finished and not child.detok.finished:
                child.detok.finish()
            lp = logprobs.get(req.request_id)
            out = CompletionOutput(
                index=child.index,
                text=child.detok.get_delta(),
                token_ids=[token],
                logprobs=[lp] if lp is not None else None,
                finish_reason=req.status.finish_reason,
                stop_reason=req.stop_reason,
            )
            parent = child.parent
            ro = by_parent.get(parent.request_id)
            if ro is None:
                ro = by_parent[parent.request_id] = RequestOutput(
                    parent.request_id,
                    parent.prompt_token_ids,
                    [],
                    False,
                    max(req.num_cached_tokens, 0),
                )
                if not parent.sent_first:
                    parent.sent_first = True
                    if req.sampling_params.prompt_logprobs is not None:
                        ro.prompt_logprobs = [None, *req.prompt_logprobs]
            ro.outputs.append(out)
        for ro in by_parent.values():
            parent = self._parents[ro.request_id]
            if all(r.is_finished for r in parent.children):
                ro.finished = True
                del self._parents[ro.request_id]
                for r in parent.children:
                    self._children.pop(r.request_id, None)
        return list(by_parent.values())

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_blocks_total=self.num_kv_blocks,
            kv_blocks_used=self.num_kv_blocks - self.kv.num_free_blocks,
            prefix_queried_tokens=self.kv.num_queried_tokens,
            prefix_hit_tokens=self.kv.num_hit_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            kv_format=self.kv_format,
            kv_block_bytes=self.kv_block_bytes,
            expert_tokens=(
                tuple(self.expert_token_counts.tolist())
                if self.expert_token_counts is not None
                else ()
            ),
            **self._connector_stats(),
        )

    def _connector_stats(self) -> dict:
        if self.connector is None:
            return {}
        return {
            "prefix_remote_queried_tokens": self.connector.num_queried_tokens,
            "prefix_remote_hit_tokens": self.connector.num_hit_tokens,
            "kv_store": self.connector.stats(),
        }

    def close(self) -> None:
        """Stop the grammar pool and the connector (its threads and any server it started).
        The engine serves no step after this."""
        self.grammars.close()
        if self.connector is not None:
            self.connector.close()
