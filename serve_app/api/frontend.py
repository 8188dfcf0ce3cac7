"""FrontEnd: the API's EngineClient over an engine core, in-process or the router replicas.

The one place a request's text is made: its prompt tokenized once (`encode_prompt`), checked
against the context, fanned out into its n sequences, sent to the core as token ids, and the
core's token outputs turned back into text deltas, stop strings matched (an abort to the core
when one ends a sequence the core still runs) and choices merged (serve_app/frontend's
OutputProcessor). The in-process server and the Serve ingress run this same code.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from serve_app.api.adapter_rollouts import AdapterRollouts, server_error
from serve_app.api.adapters import AdapterCatalog
from serve_app.api.client import CoreCall, EngineCore, RouteHint, Submitted
from serve_app.api.errors import APIError
from serve_app.engine.errors import InvalidRequestError
from serve_app.engine.outputs import RequestOutput
from serve_app.engine.request import SamplingParams, resolve_max_tokens
from serve_app.frontend.output_processor import OutputProcessor, RequestState
from serve_app.lora import PIN_REFUSED
from serve_app.rollout.adapter import AdapterChoice
from serve_app.rollout.window import Outcome


class FrontEnd:
    def __init__(
        self,
        core: EngineCore,
        tokenizer: Any,
        model_name: str,
        version: str,
        max_model_len: int,
        adapters: dict[str, str] | None = None,
        adapter_rollouts: AdapterRollouts | None = None,
        pinned: tuple[str, ...] = (),
    ):
        """adapters: the LoRA adapters served from the start, name -> PEFT directory;
        adapter_rollouts: the splits of adapters under a rollout (api/adapter_rollouts.py);
        pinned: those of `adapters` never evicted (lora.pinned)."""
        self.core = core
        self.adapters = AdapterCatalog(model_name, adapters, pinned)
        self.adapter_rollouts = adapter_rollouts or AdapterRollouts()
        self.tokenizer = tokenizer
        self.processor = OutputProcessor(tokenizer)
        self.model_name = model_name
        self.version = version
        self.max_model_len = max_model_len

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        return self.processor.encode(prompt)

    def check_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Refuse a prompt that leaves no room for its completion, as the engine would."""
        resolve_max_tokens(len(prompt_token_ids), params.max_tokens, self.max_model_len)

    async def submit(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str,
        hint: RouteHint | None = None,
    ) -> Submitted:
        """Validate and queue; raise InvalidRequestError & co. before returning the stream."""
        ids = self.encode_prompt(prompt)
        self.check_prompt(ids, params)
        hint = hint or RouteHint()
        choice = self.adapter_rollouts.choose(hint, request_id)
        if choice is None:
            state = self.processor.new_request(request_id, ids, params, hint.lora)
            call = await self.core.add(request_id, state.requests, hint)
            return Submitted(_outputs(state, call), call.version)
        return await self._submit_adapter_version(ids, params, request_id, hint, choice)

    async def _submit_adapter_version(
        self,
        ids: list[int],
        params: SamplingParams,
        request_id: str,
        hint: RouteHint,
        choice: AdapterChoice,
    ) -> Submitted:
        """A request for an adapter under a rollout, on the version the split chose. A failure
        before the first token on a split-chosen candidate is retried once on the stable
        version: a bad candidate costs the client no failed request (the controller still
        counts the failure and rolls the candidate back)."""
        rollouts, public = self.adapter_rollouts, hint.lora.name
        t0 = time.monotonic()
        state = self.processor.new_request(request_id, ids, params, choice.ref)
        try:
            rollouts.inject_fault(choice)
            call = await self.core.add(request_id, state.requests, replace(hint, lora=choice.ref))
        except Exception as e:
            if server_error(e):
                rollouts.report(public, Outcome(choice.version, ok=False))
            if not choice.retry or not server_error(e):
                raise
            return await self._submit_adapter_version(
                ids, params, request_id, hint, choice.on_stable()
            )
        call = rollouts.watch(call, public, choice.version, t0)
        return Submitted(_outputs(state, call), call.version)

    async def health(self) -> dict:
        return await self.core.health()

    async def load_adapter(self, name: str, path: str, pinned: bool = False) -> None:
        """Load (or reload) adapter `name` from `path` in the engine, then serve it under that
        name (pinned: never evicted); InvalidRequestError (a 400) with the reason when it
        cannot be served or pinned, a 409 while the name is under a rollout (its versions come
        from the rollout controller)."""
        self._not_under_rollout(name)
        ref = self.adapters.next_ref(name, path, pinned)
        error = await self.core.load_adapter(ref)
        if error is not None:
            param = "pinned" if error.startswith(PIN_REFUSED) else "lora_path"
            raise InvalidRequestError(error, param)
        self.adapters.put(ref)

    async def unload_adapter(self, name: str) -> None:
        """Stop serving `name` and drop it from the engines, with the version a finished
        rollout of it left serving; a 409 while a rollout of it runs (more than one live
        version: promote or abort it first)."""
        split = self.adapter_rollouts.splits.get(name)
        live = [v for v, w in split.weights if w > 0] if split is not None else []
        if len(live) > 1:
            self._not_under_rollout(name)
        ref = self.adapters.remove(name)  # new requests naming it get a 404 from here on
        await self.core.unload_adapter(ref)
        for version in live:
            if split.refs[version] != ref:
                await self.core.unload_adapter(split.refs[version])

    def _not_under_rollout(self, name: str) -> None:
        if self.adapter_rollouts.has(name):
            raise APIError(
                409,
                f"the LoRA adapter `{name}` is under a rollout: use `moeserve rollout ... "
                f"--adapter {name}` (promote or abort it first)",
                "conflict_error",
                "lora_name",
            )


async def _outputs(state: RequestState, call: CoreCall) -> AsyncIterator[RequestOutput]:
    """The request's text deltas; what arrived while the consumer was busy comes as one.
    Closing it early aborts the request in the core, which frees its KV blocks."""
    try:
        while not state.finished:
            out = state.process(await call.next())
            if state.to_abort:
                call.abort(state.take_aborts())
            if out is not None:
                yield out
    finally:
        call.close(state.finished)
