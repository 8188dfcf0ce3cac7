"""LocalEngineClient: the API's EngineClient over an AsyncLLMEngine in this process
(`moeserve serve` without Ray, the API tests): the front end (api/frontend.py), the same code
as the Serve ingress, over `LocalCore`."""

from __future__ import annotations

import asyncio
from typing import Any

from serve_app.api.client import RouteHint
from serve_app.api.frontend import FrontEnd
from serve_app.engine.async_engine import AsyncLLMEngine
from serve_app.engine.errors import EngineError
from serve_app.engine.outputs import EngineOutput, EngineRequest, LoraRef
from serve_app.lora.peft_format import LoraError


class LocalCore:
    """The engine core in this process: sequences to AsyncLLMEngine, outputs from a queue."""

    def __init__(self, engine: AsyncLLMEngine):
        self.engine = engine

    async def add(
        self, request_id: str, requests: list[EngineRequest], hint: RouteHint
    ) -> _LocalCall:
        await self.engine.before_add(requests[0])
        call = _LocalCall(self.engine, [r.request_id for r in requests])
        self.engine.add_request_to(requests, call.queue)
        return call

    async def health(self) -> dict:
        return self.engine.health()

    async def load_adapter(self, ref: LoraRef) -> str | None:
        lora = self.engine.engine.lora
        try:  # off the event loop: it reads the adapter's files
            await asyncio.to_thread(lora.load, ref.name, ref.path, ref.revision, ref.pinned)
        except LoraError as e:
            return str(e)
        return None

    async def unload_adapter(self, ref: LoraRef) -> None:
        self.engine.engine.lora.unload(ref.name, up_to=ref.revision)


class _LocalCall:
    version = None

    def __init__(self, engine: AsyncLLMEngine, request_ids: list[str]):
        self.engine = engine
        self.live = set(request_ids)
        self.queue: asyncio.Queue[EngineOutput | EngineError] = asyncio.Queue()

    async def next(self) -> list[EngineOutput]:
        items = [await self.queue.get()]
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        outs = []
        for item in items:
            if isinstance(item, EngineError):
                self.live.clear()  # the engine already dropped them
                raise item
            if item.finish_reason is not None:
                self.live.discard(item.request_id)
            outs.append(item)
        return outs

    def abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            if rid in self.live:
                self.live.discard(rid)
                self.engine.abort(rid)

    def close(self, finished: bool) -> None:
        self.abort(list(self.live))


class LocalEngineClient(FrontEnd):
    def __init__(
        self,
        engine: AsyncLLMEngine,
        model_name: str,
        tokenizer: Any = None,
    ):
        """tokenizer: the front end's own (None: loaded from the checkpoint, as the ingress
        loads it; the engine's stays with its grammars)."""
        self.engine = engine
        config = engine.engine.config
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(config.model)
        max_model_len = engine.engine.max_model_len
        adapters = dict(config.lora_adapters)  # the engine loaded them at start
        super().__init__(
            LocalCore(engine), tokenizer, model_name, model_name, max_model_len, adapters,
            pinned=config.lora_pinned,
        )  # fmt: skip
