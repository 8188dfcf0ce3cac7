"""The router replica: the engine (attention, gates, KV cache, scheduler) behind a Serve
deployment. Streams engine outputs to the ingress over a Serve streaming handle."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from serve_app.config import AppConfig
from serve_app.engine.async_engine import AsyncLLMEngine
from serve_app.engine.errors import EngineError
from serve_app.engine.request import SamplingParams

log = logging.getLogger(__name__)


class Router:
    def __init__(self, config: AppConfig):
        self.config = config
        self.engine = AsyncLLMEngine.from_config(config.engine_config())

    async def info(self) -> dict:
        return {"max_model_len": self.engine.engine.max_model_len}

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator:
        """First item: {"accepted": True} or {"error": EngineError}; then RequestOutputs.

        Refusals travel as a value, not an exception, so the ingress can answer 4xx/503
        before it sends any byte of the response.
        """
        try:
            stream = self.engine.add_request(prompt, params, request_id)
        except EngineError as e:
            yield {"error": e}
            return
        yield {"accepted": True}
        async for out in stream:
            yield out

    async def health(self) -> dict:
        return self.engine.health()

    def check_health(self) -> None:
        """Serve's replica health check: a dead engine loop makes Serve replace the replica."""
        if self.engine.dead_error is not None:
            raise RuntimeError(f"engine loop died: {self.engine.dead_error}")
