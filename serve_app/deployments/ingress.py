"""The HTTP ingress deployment: the OpenAI routes of serve_app.api over handles to the routers
of each model version (the base version bound in the app, rollout versions as their own apps).

The tokenizer is loaded here too (no weights): chat templates, /tokenize and logprob token text
need it, and it keeps that CPU work off the router replicas.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle
from transformers import AutoTokenizer

from serve_app.api.client import RouteHint, Submitted
from serve_app.api.errors import http_status
from serve_app.api.routes import create_app
from serve_app.config import AppConfig
from serve_app.deployments.output_channel import OutputInbox
from serve_app.deployments.output_wire import ErrorRecord, Record
from serve_app.deployments.rollout_actor import get_or_create_controller
from serve_app.deployments.versions import TrafficSplit
from serve_app.engine.errors import EngineError
from serve_app.engine.outputs import RequestOutput, coalesce
from serve_app.engine.request import SamplingParams
from serve_app.messages import Refused
from serve_app.metrics import use_ray_metrics
from serve_app.replica_picking.key import RouteKeys
from serve_app.rollout.state import Version
from serve_app.rollout.window import Outcome

log = logging.getLogger(__name__)


class RemoteEngineClient:
    """EngineClient over Serve handles to the routers of every live model version."""

    def __init__(
        self,
        versions: TrafficSplit,
        config: AppConfig,
        max_model_len: int,
        inbox: OutputInbox,
    ):
        self.versions = versions
        self.inbox = inbox
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
    ) -> Submitted:
        """Route to a version; a split-traffic request that fails on a non-stable version
        before its first token is retried once on the stable one (no client-visible failure
        from a bad canary). Returns the stream and the version that took it."""
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
        return Submitted(stream, version)

    async def _submit_to(self, version: str, prompt, params, request_id: str, hint: RouteHint):
        """The request through Serve, its outputs over the output channel (see
        output_channel.py). Returns once the first token is here: until then nothing was sent
        to the client, so a failure can still be retried elsewhere."""
        t0 = time.monotonic()
        handle = self.versions.handle(version)
        route = await self.route_keys.kwargs(version, handle, prompt, hint.session, request_id)
        stream, queue = self.inbox.open()
        response = handle.generate_to.remote(
            prompt, params, request_id, self.inbox.reply_to, stream, **route
        )
        reader = _ChannelReader(request_id, queue, response, lambda: self.inbox.close(stream))
        try:
            first = await reader.next()
        except BaseException:
            reader.close(finished=False)
            raise
        ttft = (time.monotonic() - t0) * 1000
        return _relay(reader, first, _Reporter(self.versions, version, t0, ttft))

    async def health(self) -> dict:
        return await self.versions.handle(self.versions.base).health.remote()


CHANNEL_GRACE_S = 30.0  # after the call returned, how long its last records may take


class _ChannelReader:
    """One request's records from the inbox queue, and the Serve call that runs it.

    The call ends when the request did: with Refused if it was refused, raising if the
    router failed, else None; its records may still be on the wire then (two paths), so a
    normal end only starts a grace period for them."""

    def __init__(self, request_id: str, queue: asyncio.Queue, response, release):
        self.request_id, self.queue, self.response = request_id, queue, response
        self.release = release  # gives the stream's inbox slot back
        self.prompt_token_ids: list[int] = []
        self.call = asyncio.ensure_future(_result(response))
        self.call.add_done_callback(lambda _: queue.put_nowait(None))  # wakes next()
        self.deadline: float | None = None

    async def next(self) -> RequestOutput:
        """What arrived since the last call, as one output; raises the request's error."""
        records = [await self._get()]
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if item is not None:
                records.append(item)
        outs = []
        for record in records:
            if isinstance(record, ErrorRecord):
                raise record.error
            out = record.output
            if out.prompt_token_ids:  # the first record's
                self.prompt_token_ids = out.prompt_token_ids
            out.request_id, out.prompt_token_ids = self.request_id, self.prompt_token_ids
            outs.append(out)
        return coalesce(outs)

    async def _get(self) -> Record:
        while True:
            if self.deadline is None:
                item = await self.queue.get()
            else:
                left = self.deadline - time.monotonic()
                try:
                    item = await asyncio.wait_for(self.queue.get(), max(left, 0.0))
                except asyncio.TimeoutError:
                    raise EngineError("the router's output channel lost this stream") from None
            if item is not None:
                return item
            if self.deadline is None:  # the call ended
                result = self.call.result()  # raises what the router raised
                if isinstance(result, Refused):
                    raise result.error
                self.deadline = time.monotonic() + CHANNEL_GRACE_S

    def close(self, finished: bool) -> None:
        """The stream is over: free its inbox slot; an unfinished request's call is cancelled,
        which aborts it on the router."""
        self.release()
        if not finished and not self.call.done():
            self.response.cancel()
            self.call.cancel()


async def _result(response):
    return await response


def _client_error(e: BaseException) -> bool:
    return isinstance(e, EngineError) and http_status(e)[0] < 500


@dataclass(slots=True)
class _Reporter:
    versions: TrafficSplit
    version: str
    t0: float
    ttft_ms: float

    def done(self, ok: bool) -> None:
        e2e = (time.monotonic() - self.t0) * 1000
        self.versions.report(Outcome(self.version, ok, self.ttft_ms, e2e))


async def _relay(
    source: _ChannelReader, first: RequestOutput, reporter: _Reporter
) -> AsyncIterator[RequestOutput]:
    """Forward the router's outputs (over the channel, what piled up while the consumer was
    busy comes as one); closing this early aborts the request on the router, which frees its
    KV blocks."""
    finished = first.finished
    try:
        yield first
        while not finished:
            out = await source.next()
            finished = out.finished
            yield out
        reporter.done(ok=True)
    except Exception as e:
        reporter.done(ok=_client_error(e))
        raise
    finally:
        source.close(finished)


@serve.ingress()
class Ingress:
    def __init__(self, router: DeploymentHandle, config: AppConfig):
        self.router = router
        self.config = config
        use_ray_metrics()  # this replica's request metrics go to its node's Ray metrics agent

    async def __serve_build_asgi_app__(self):
        info = await self.router.info.remote()
        app = serve.get_replica_context().app_name
        base = Version(self.config.version_name, self.config.model, info.digest)
        controller, registered = get_or_create_controller(app, base)
        await registered
        versions = TrafficSplit(base.name, self.router, controller)
        await versions.refresh()
        versions.start()
        inbox = OutputInbox(ray.util.get_node_ip_address())
        await inbox.start()
        client = RemoteEngineClient(versions, self.config, info.max_model_len, inbox)
        raw = os.environ.get(self.config.api_key_env, "")
        keys = frozenset(k.strip() for k in raw.split(",") if k.strip())
        return create_app(
            client,
            api_keys=keys,
            stream_interval=self.config.streaming.stream_interval,
            unknown_fields=self.config.api.unknown_fields,
        )
