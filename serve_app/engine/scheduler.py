"""Continuous-batching scheduler: one token-budget loop, no separate prefill and decode phases.

Modelled on vLLM v1. Every step, each running request asks for the tokens it still has to
compute (a whole prompt chunk, or one token while decoding), running requests first, then
waiting ones in FCFS order, until max_num_batched_tokens or max_num_seqs is reached. Long
prompts are chunked. When blocks run out, the most recently admitted running request is
preempted: its blocks are freed and it will be recomputed (prefix caching usually makes that
cheap). An optional external prefix source (a shared-prefix connector) extends a new request's
local prefix-cache hit; its blocks are allocated here and filled by the engine before the
step runs. With `max_loras_per_batch` set, admission also keeps the distinct LoRA adapters of
the running requests within that cap, skipping a waiting request that would exceed it, with a
bound on how long it waits (engine/lora_cap.py). No torch here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from serve_app.engine.kv_cache_manager import NO_HIT, KVCacheManager
from serve_app.engine.lora_cap import LoraCap
from serve_app.engine.request import Request, RequestStatus


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool = True
    # distinct LoRA adapters among the running requests (so in any step); None: no cap
    max_loras_per_batch: int | None = None


@dataclass(frozen=True, slots=True)
class ExternalLoad:
    """Blocks the engine must fill from an external source before this step runs."""

    request_id: str
    block_ids: list[int]
    handle: object  # the source's own record of what it matched


class ExternalPrefixSource(Protocol):
    def match(self, request: Request, num_local_blocks: int) -> tuple[int, object]:
        """How many full blocks after the first num_local_blocks it can supply, and a handle.

        Must leave the last prompt token unmatched, and must not fail later: a block it
        reports is one it already holds."""
        ...


@dataclass(slots=True)
class SchedulerOutput:
    """What to run this step. num_new_tokens[i] belongs to requests[i]; tokens are computed
    from requests[i].num_computed_tokens - num_new_tokens[i] onwards (the scheduler has already
    advanced num_computed_tokens)."""

    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # requests[:num_running_scheduled] were already running; the rest were admitted this step
    num_running_scheduled: int = 0
    external_loads: list[ExternalLoad] = field(default_factory=list)

    @property
    def total_num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.requests


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv: KVCacheManager,
        external: ExternalPrefixSource | None = None,
    ):
        self.config = config
        self.kv = kv
        self.external = external
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        n = config.max_loras_per_batch
        self.lora_cap = None if n is None else LoraCap(n, patience=config.max_num_seqs)
        # Told of every request that finishes (the sampler drops its per-request state).
        self.on_finish: Callable[[list[Request]], None] | None = None

    # ---- admission and removal -------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        self.kv.update_block_hashes(request)
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """Finish (stop or abort) requests wherever they are; every block goes back."""
        done = []
        for rid in request_ids:
            req = self.requests.pop(rid, None)
            if req is None:
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            req.status = status
            self.kv.free(req)
            if self.lora_cap is not None:
                self.lora_cap.forget(rid)
            done.append(req)
        if self.on_finish is not None and done:
            self.on_finish(done)
        return done

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ---- the step ---------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        chunked = self.config.enable_chunked_prefill

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = req.num_tokens - req.num_computed_tokens
            if num_new > budget and not chunked:
                i += 1
                continue
            num_new = min(num_new, budget)
            while self.kv.allocate_slots(req, num_new) is None:
                victim = self.running.pop()  # lowest priority: admitted last
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:
                break  # req preempted itself: nothing behind it is left to run
            self._schedule(out, req, num_new)
            budget -= num_new
            i += 1

        out.num_running_scheduled = len(out.requests)
        cap = self.lora_cap
        if cap is not None:
            cap.begin(self.running)
        skipped: list[Request] = []  # held back by the LoRA cap: they keep their place
        # NOTE: no admissions in a step that had to preempt; the pool is full already.
        while (
            not out.preempted
            and self.waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            req = self.waiting[0]
            if cap is not None and not cap.admits(req):
                skipped.append(self.waiting.popleft())
                continue
            # Prompt logprobs need every prompt position computed: no prefix-cache hit (vLLM).
            fresh = req.num_computed_tokens == 0 and req.sampling_params.prompt_logprobs is None
            hit = self.kv.get_computed_blocks(req) if fresh else NO_HIT
            num_ext, handle = 0, None
            if self.external is not None and fresh:
                num_ext_blocks, handle = self.external.match(req, len(hit.blocks))
                num_ext = num_ext_blocks * self.kv.block_size
            num_new = req.num_tokens - req.num_computed_tokens - hit.num_tokens - num_ext
            if num_new > budget:
                if not chunked:
                    break
                num_new = budget
            new_blocks = self.kv.allocate_slots(req, num_ext + num_new, hit, num_ext)
            if new_blocks is None:
                break
            if num_ext:
                ids = [b.block_id for b in new_blocks[: num_ext // self.kv.block_size]]
                out.external_loads.append(ExternalLoad(req.request_id, ids, handle))
            self.waiting.popleft()
            req.num_computed_tokens += hit.num_tokens + num_ext
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = hit.num_tokens + num_ext
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            if cap is not None:
                cap.admitted(req)
            self._schedule(out, req, num_new)
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))
        return out

    def _schedule(self, out: SchedulerOutput, req: Request, num_new: int) -> None:
        out.requests.append(req)
        out.num_new_tokens.append(num_new)
        req.num_computed_tokens += num_new

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def update_from_output(
        self, out: SchedulerOutput, sampled: dict[str, int]
    ) -> tuple[list[Request], list[Request]]:
        """Append each sampled token and apply the token-level stop checks.

        Returns (requests that got a new token, requests that finished this step).
        """
        advanced, finished = [], []
        for req in out.requests:
            token = sampled.get(req.request_id)
            if token is None or req.status != RequestStatus.RUNNING:
                continue  # mid-prompt chunk, or finished meanwhile
            req.append_output_token(token)
            self.kv.update_block_hashes(req)
            advanced.append(req)
            status = self._check_stop(req, token)
            if status is not None:
                self.finish_requests([req.request_id], status)
                finished.append(req)
        return advanced, finished

    def _check_stop(self, req: Request, token: int) -> RequestStatus | None:
        params = req.sampling_params
        if req.num_output_tokens >= params.min_tokens:
            if token in req.eos_token_ids and not params.ignore_eos:
                return RequestStatus.FINISHED_STOPPED
            if token in params.stop_token_ids:
                req.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
