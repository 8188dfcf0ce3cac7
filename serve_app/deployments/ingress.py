"""The HTTP ingress deployment: the OpenAI routes of serve_app.api over a handle to the routers.

The tokenizer is loaded here too (no weights): chat templates, /tokenize and logprob token text
need it, and it keeps that CPU work off the router replicas.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

from ray import serve
from ray.serve.handle import DeploymentHandle
from transformers import AutoTokenizer

from serve_app.api.routes import create_app
from serve_app.config import AppConfig
from serve_app.engine.outputs import RequestOutput
from serve_app.engine.request import SamplingParams
from serve_app.metrics import use_ray_metrics


class RemoteEngineClient:
    """EngineClient over a Serve handle to the Router deployment."""

    def __init__(self, router: DeploymentHandle, config: AppConfig, max_model_len: int):
        self.router = router
        self.model_name = config.model_name
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self.max_model_len = max_model_len

    async def submit(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        gen = self.router.options(stream=True).generate.remote(prompt, params, request_id)
        first = await gen.__anext__()
        if "error" in first:
            gen.cancel()
            raise first["error"]
        return _relay(gen)

    async def health(self) -> dict:
        return await self.router.health.remote()


async def _relay(gen) -> AsyncIterator[RequestOutput]:
    """Forward the router's outputs; closing this early cancels the remote generator, which
    aborts the request on the router and frees its KV blocks."""
    finished = False
    try:
        async for out in gen:
            yield out
            finished = out.finished
    finally:
        if not finished:
            gen.cancel()


@serve.ingress()
class Ingress:
    def __init__(self, router: DeploymentHandle, config: AppConfig):
        self.router = router
        self.config = config
        use_ray_metrics()  # this replica's request metrics go to its node's Ray metrics agent

    async def __serve_build_asgi_app__(self):
        info = await self.router.info.remote()
        client = RemoteEngineClient(self.router, self.config, info["max_model_len"])
        raw = os.environ.get(self.config.api_key_env, "")
        keys = frozenset(k.strip() for k in raw.split(",") if k.strip())
        return create_app(client, api_keys=keys)
