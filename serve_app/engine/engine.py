"""LLMEngine: the synchronous, token-in/token-out core. step() = schedule, execute, update.

It takes EngineRequests (prompt token ids, n == 1) and returns EngineOutputs (token ids,
logprob ids, finish reasons): no text. Tokenizing, detokenizing, stop strings and n > 1 are
the front end's (serve_app/frontend/), once per request, off the step thread. Grammars stay
here: a grammar masks the logits of every step.
"""

from __future__ import annotations

import logging

from serve_app.engine.block_hash import adapter_root, root_hash
from serve_app.engine.errors import EngineOverloadedError, InvalidRequestError
from serve_app.engine.kv_cache_manager import KVCacheManager
from serve_app.engine.outputs import EngineOutput, EngineRequest, LoraRef
from serve_app.engine.parts import EngineParts
from serve_app.engine.request import Request, RequestStatus, SamplingParams, resolve_max_tokens
from serve_app.engine.scheduler import Scheduler, SchedulerConfig
from serve_app.engine.stats import EngineStats
from serve_app.engine.structured import GrammarCompiler
from serve_app.lora.peft_format import LoraAdapter, LoraError

log = logging.getLogger(__name__)


class LLMEngine:
    """The loop over a replica's parts (engine/parts.py: model runner, KV pool, connector,
    tokenizer): the block manager, the scheduler and the requests. build_engine
    (serve_app/runtime/factory.py) builds the parts once, with the experts and the connector
    it picks from the config."""

    def __init__(self, parts: EngineParts):
        config = self.config = parts.config
        self.spec = parts.spec
        self.eos_token_ids = parts.eos_token_ids
        self.runner = parts.runner
        self.num_kv_blocks = parts.num_kv_blocks
        self.lora_kv_blocks = parts.lora_kv_blocks
        self.kv_block_bytes = parts.kv_block_bytes
        self.kv_format = parts.spec.kv_format.tag()
        self.kv_dtype = str(parts.kv_dtype).removeprefix("torch.")  # "float32", "bfloat16"
        self.weight_bytes = parts.weight_bytes
        self.quantization = parts.quantization
        self.max_model_len = parts.max_model_len
        self.model_digest = parts.model_digest
        self.connector = parts.connector
        self.lora = parts.lora
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
                config.max_loras_per_batch,
            ),
            self.kv,
            self.connector,
        )
        self.scheduler.on_finish = self.runner.sampler.states.release
        # the tokenizer's only use here: llguidance's token masks (no text is made on this side)
        self.grammars = GrammarCompiler(parts.tokenizer, self.spec.vocab_size, self.eos_token_ids)
        self._requests: dict[str, Request] = {}  # queued or running, by id

    # ---- requests ---------------------------------------------------------------------------

    def prepare_request(self, request: EngineRequest) -> Request:
        """Validate without touching engine state (safe from any thread): the prompt's ids in
        the vocabulary, the budget within the context, the logit bias, one sequence."""
        ids, params = list(request.prompt_token_ids), request.params
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
        if params.n != 1:
            raise InvalidRequestError("the engine runs one sequence per request (n == 1)", "n")
        max_tokens = resolve_max_tokens(len(ids), params.max_tokens, self.max_model_len)
        bad = [t for t, _ in params.logit_bias if t >= vocab]
        if bad:
            raise InvalidRequestError(
                f"logit_bias has token ids outside [0, {vocab}): {bad[:5]}", "logit_bias"
            )
        req = Request(request.request_id, ids, params, self.eos_token_ids, max_tokens)
        if request.lora is not None:
            adapter = self.resolve_adapter(request.lora)
            req.lora, req.hash_root = adapter, adapter_root(self.kv.root_hash, adapter.digest)
        if params.structured is not None:  # one matcher per sequence
            req.grammar = self.grammars.matcher(params.structured)
        return req

    def resolve_adapter(self, ref: LoraRef) -> LoraAdapter:
        """The adapter `ref` names, made resident (loaded from the host tier or `ref.path`
        where it is not); InvalidRequestError naming why it cannot be."""
        try:
            return self.lora.resolve(ref.name, ref.path, ref.revision, ref.pinned)
        except LoraError as e:
            raise InvalidRequestError(str(e), "model") from e

    def compile_grammar(self, params: SamplingParams):
        """Start compiling the request's grammar on the pool; a future (None: no grammar).
        Awaiting it before prepare_request keeps even the first compile off the caller's
        event loop."""
        return None if params.structured is None else self.grammars.submit(params.structured)

    def add_prepared(self, req: Request) -> None:
        if req.request_id in self._requests:
            raise InvalidRequestError(f"duplicate request id {req.request_id!r}", "request_id")
        if self.scheduler.num_waiting >= self.config.max_waiting_requests:
            raise EngineOverloadedError("too many requests waiting; retry later")
        self._requests[req.request_id] = req
        self.scheduler.add_request(req)

    def add_request(self, request: EngineRequest) -> None:
        """Validate and queue a sequence."""
        self.add_prepared(self.prepare_request(request))

    def abort_request(self, request_id: str) -> bool:
        """Stop a sequence (the front end's stop string matched, or its client left) and free
        its blocks; False if it is not running here (already finished)."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        if not req.is_finished:
            self.scheduler.finish_requests([request_id], RequestStatus.FINISHED_ABORTED)
        return True

    def abort_all(self) -> list[str]:
        """Abort every request after a failed step, and forget the prefix cache: that step's
        blocks were published (hashed) at allocation but may hold half-written KV."""
        ids = list(self._requests)
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

    def step(self) -> list[EngineOutput]:
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
        return [self._output(req, logprobs.get(req.request_id), completed) for req in advanced]

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

    def _output(self, req: Request, logprob, completed: set[str]) -> EngineOutput:
        """The step's token of one sequence; its prompt logprobs with its first token."""
        out = EngineOutput(
            req.request_id,
            [req.output_token_ids[-1]],
            [logprob] if logprob is not None else None,
            req.status.finish_reason,
            req.stop_reason if isinstance(req.stop_reason, int) else None,
            req.status == RequestStatus.FINISHED_STOPPED and req.request_id not in completed,
            max(req.num_cached_tokens, 0),
        )
        if req.num_output_tokens == 1 and req.sampling_params.prompt_logprobs is not None:
            out.prompt_logprobs = [None, *req.prompt_logprobs]
        if req.is_finished:
            self._requests.pop(req.request_id, None)
        return out

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_blocks_total=self.num_kv_blocks,
            kv_blocks_used=self.num_kv_blocks - self.kv.num_free_blocks,
            kv_lora_blocks=self.lora_kv_blocks,
            prefix_queried_tokens=self.kv.num_queried_tokens,
            prefix_hit_tokens=self.kv.num_hit_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            kv_format=self.kv_format,
            kv_block_bytes=self.kv_block_bytes,
            kv_dtype=self.kv_dtype,
            weight_bytes=self.weight_bytes,
            quantization=self.quantization,
            **self._lora_stats(),
            expert_tokens=(
                tuple(self.expert_token_counts.tolist())
                if self.expert_token_counts is not None
                else ()
            ),
            **self._connector_stats(),
        )

    def _lora_stats(self) -> dict:
        """Per step: nothing to walk in an engine that never loaded an adapter."""
        lora = self.lora
        if not lora.num_loads:
            return {"lora_max": lora.max_loras, "lora_budget_bytes": lora.limits.max_bytes}
        return {
            **{f"lora_{k}": v for k, v in lora.memory()._asdict().items()},
            "lora_loads": lora.num_loads,
            "lora_host_loads": lora.num_host_loads,
            "lora_evictions": lora.num_evictions,
            "lora_max": lora.max_loras,
            "lora_running": _adapter_names(self.scheduler.running),
            "lora_waiting": _adapter_names(self.scheduler.waiting),
        }

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


def _adapter_names(requests) -> tuple[str, ...]:
    return tuple(sorted({r.lora.name for r in requests if r.lora is not None}))
