"""LocalEngineClient: the API's EngineClient over an AsyncLLMEngine in this process
(`moeserve serve` without Ray, the API tests)."""

from __future__ import annotations

from serve_app.api.client import RouteHint, Submitted
from serve_app.engine.async_engine import AsyncLLMEngine
from serve_app.engine.request import SamplingParams


class LocalEngineClient:
    def __init__(self, engine: AsyncLLMEngine, model_name: str):
        self.engine = engine
        self.model_name = model_name
        self.version = model_name
        self.tokenizer = engine.engine.tokenizer
        self.max_model_len = engine.engine.max_model_len

    async def submit(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str,
        hint: RouteHint | None = None,
    ) -> Submitted:
        await self.engine.compile_grammar(params)
        return Submitted(self.engine.add_request(prompt, params, request_id))

    async def health(self) -> dict:
        return self.engine.health()
