"""The HTTP ingress deployment: the OpenAI routes of serve_app.api over handles to the routers
of each model version (the base version bound in the app, rollout versions as their own apps).

The tokenizer is loaded here too (no weights): chat templates, /tokenize and logprob token text
need it, and it keeps that CPU work off the router replicas.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ray import serve
from ray.serve.handle import DeploymentHandle
from transformers import AutoTokenizer

from serve_app.api.client import RouteHint
from serve_app.api.routes import create_app
from serve_app.config import AppConfig
from serve_app.deployments.versions import VersionRouter
from serve_app.engine.errors import EngineError
from serve_app.engine.outputs import RequestOutput
from serve_app.engine.request import SamplingParams
from serve_app.metrics import use_ray_metrics
from serve_app.rollout.actor import get_or_create_controller
from serve_app.rollout.state import Version
from serve_app.rollout.window import Outcome
from serve_app.routing.key import RouteKeys

log = logging.getLogger(__name__)


class RemoteEngineClient:
    """EngineClient over Serve handles to the routers of every live model version."""

    def __init__(self, versions: VersionRouter, config: AppConfig, max_model_len: int):
        self.versions = versions
        self.model_name = config.model_name
        self.version = versions.base
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self.max_model_len = max_model_len
        self.route_keys = RouteKeys(self.tokenizer)

    async def submit(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str,
        hint: RouteHint | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Route to a version; a split-traffic request that fails on a non-stable version
        before its first token is retried once on the stable one (no client-visible failure
        from a bad canary)."""
        hint = hint or RouteHint()
        version = self.versions.choose(hint, request_id)
        retry = hint.pinned is None and version != self.versions.stable
        try:
            stream = await self._submit_to(version, prompt, params, request_id, hint)
        except Exception as e:
            if not retry or _client_error(e):
                if not _client_error(e):
                    self.versions.report(Outcome(version, ok=False))
                raise
            log.warning("request %s failed on %s, retrying on stable: %s", request_id, version, e)
            self.versions.report(Outcome(version, ok=False))
            version = self.versions.stable
            stream = await self._submit_to(version, prompt, params, request_id, hint)
        hint.served = version
        return stream

    async def _submit_to(self, version: str, prompt, params, request_id: str, hint: RouteHint):
        t0 = time.monotonic()
        handle = self.versions.handle(version)
        # prefix_affinity: the request router of this version's handle reads `route`.
        route = await self.route_keys.kwargs(version, handle, prompt, hint.session, request_id)
        gen = handle.options(stream=True).generate.remote(prompt, params, request_id, **route)
        try:
            first = await gen.__anext__()
            if "error" in first:
                raise first["error"]
            # Wait for the first token here: until then nothing was sent, so a failure can
            # still be retried elsewhere.
            out = await gen.__anext__()
        except BaseException:
            gen.cancel()
            raise
        ttft = (time.monotonic() - t0) * 1000
        return _relay(gen, out, _Reporter(self.versions, version, t0, ttft))

    async def health(self) -> dict:
        return await self.versions.handle(self.versions.base).health.remote()


def _client_error(e: BaseException) -> bool:
    return isinstance(e, EngineError) and e.http_status < 500


@dataclass(slots=True)
class _Reporter:
    versions: VersionRouter
    version: str
    t0: float
    ttft_ms: float

    def done(self, ok: bool) -> None:
        e2e = (time.monotonic() - self.t0) * 1000
        self.versions.report(Outcome(self.version, ok, self.ttft_ms, e2e))


async def _relay(gen, first: RequestOutput, reporter: _Reporter) -> AsyncIterator[RequestOutput]:
    """Forward the router's outputs; closing this early cancels the remote generator, which
    aborts the request on the router and frees its KV blocks."""
    finished = first.finished
    try:
        yield first
        if not finished:
            async for out in gen:
                yield out
                finished = out.finished
        reporter.done(ok=True)
    except Exception as e:
        reporter.done(ok=_client_error(e))
        raise
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
        app = serve.get_replica_context().app_name
        base = Version(self.config.version_name, self.config.model, info.get("digest"))
        controller, registered = get_or_create_controller(app, base)
        await registered
        versions = VersionRouter(base.name, self.router, controller)
        await versions.refresh()
        versions.start()
        client = RemoteEngineClient(versions, self.config, info["max_model_len"])
        raw = os.environ.get(self.config.api_key_env, "")
        keys = frozenset(k.strip() for k in raw.split(",") if k.strip())
        return create_app(client, api_keys=keys)
