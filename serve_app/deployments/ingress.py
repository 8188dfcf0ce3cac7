"""The HTTP ingress deployment: the OpenAI routes of serve_app.api over handles to the routers
of each model version (the base version bound in the app, rollout versions as their own apps).

The front end runs here (api/frontend.py, the same code as the in-process server): the
tokenizer is loaded here (no weights), a prompt is tokenized once, the routers get token ids
and send token ids back, and detokenizing, stop strings, n > 1 and rendering happen here, off
the router replicas' step threads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle
from transformers import AutoTokenizer

from serve_app.api.adapter_rollouts import AdapterRollouts
from serve_app.api.client import RouteHint
from serve_app.api.errors import http_status
from serve_app.api.frontend import FrontEnd
from serve_app.api.routes import api_keys_from_env, create_app
from serve_app.config import AppConfig
from serve_app.deployments.output_channel import OutputInbox
from serve_app.deployments.output_wire import ErrorRecord, Record
from serve_app.deployments.rollout_actor import get_or_create_controller
from serve_app.deployments.versions import TrafficSplit
from serve_app.engine.errors import EngineError
from serve_app.engine.outputs import EngineOutput, EngineRequest, LoraRef
from serve_app.lora.unloads import Unload
from serve_app.messages import Refused
from serve_app.metrics import use_ray_metrics
from serve_app.replica_picking.key import RouteKeys
from serve_app.rollout.state import Version
from serve_app.rollout.window import Outcome

log = logging.getLogger(__name__)


class RouterCore:
    """The engine core behind Serve (api/client.py's EngineCore): the router replicas of
    every live model version, sent a request's sequences as token ids, read back over the
    output channel. The front end (api/frontend.py) over it makes the text."""

    def __init__(self, versions: TrafficSplit, inbox: OutputInbox):
        self.versions = versions
        self.inbox = inbox
        self.route_keys = RouteKeys()

    async def add(
        self, request_id: str, requests: list[EngineRequest], hint: RouteHint
    ) -> _ChannelCall:
        """Route to a version; a split-traffic request that fails on a non-stable version
        before its first token is retried once on the stable one (no client-visible failure
        from a bad canary)."""
        version = self.versions.choose(hint, request_id)
        retry = hint.pinned is None and version != self.versions.stable
        try:
            return await self._add_to(version, request_id, requests, hint)
        except Exception as e:
            if not retry or _client_error(e):
                if not _client_error(e):
                    self.versions.report(Outcome(version, ok=False))
                raise
            log.warning("request %s failed on %s, retrying on stable: %s", request_id, version, e)
            self.versions.report(Outcome(version, ok=False))
            return await self._add_to(self.versions.stable, request_id, requests, hint)

    async def _add_to(
        self, version: str, request_id: str, requests: list[EngineRequest], hint: RouteHint
    ) -> _ChannelCall:
        """The sequences through Serve, their outputs over the output channel (see
        output_channel.py). Returns once the first token is here: until then nothing was sent
        to the client, so a failure can still be retried elsewhere."""
        t0 = time.monotonic()
        handle = self.versions.handle(version)
        prompt, lora = requests[0].prompt_token_ids, requests[0].lora
        route = await self.route_keys.kwargs(
            version, handle, prompt, hint.session, request_id, lora
        )
        stream, queue = self.inbox.open()
        response = handle.generate_to.remote(requests, self.inbox.reply_to, stream, **route)
        call = _ChannelCall(self.inbox, stream, queue, response, version)
        try:
            await call.first()
        except BaseException:
            call.close(finished=False)
            raise
        call.reporter = _Reporter(self.versions, version, t0, (time.monotonic() - t0) * 1000)
        return call

    async def health(self) -> dict:
        return await self.versions.handle(self.versions.base).health.remote()

    async def load_adapter(self, ref: LoraRef) -> str | None:
        """Loaded (so checked) by one router replica of the stable version; the others load it
        from ref.path on their first request that names it."""
        return await self.versions.handle(self.versions.stable).load_adapter.remote(ref)

    async def unload_adapter(self, ref: LoraRef) -> None:
        """To one router replica of each live version: it drops the adapter now, with its
        version's expert shards, and its version's other replicas within a second or two
        (deployments/adapter_unloads.py; docs/lora.md). A failure on the stable version is
        raised; on another, logged (its replicas keep the adapter until their LRU evicts it)."""
        unload = Unload(ref.name, ref.revision)
        stable = self.versions.stable
        versions = [stable, *(v for v in self.versions.split.apps if v != stable)]
        results = await asyncio.gather(
            *(self.versions.handle(v).unload_adapter.remote(unload) for v in versions),
            return_exceptions=True,
        )
        for version, result in zip(versions, results, strict=True):
            if isinstance(result, BaseException):
                if version == stable:
                    raise result
                log.warning("unload of %s on version %s failed: %s", ref.name, version, result)


CHANNEL_GRACE_S = 30.0  # after the call returned, how long its last records may take


class _ChannelCall:
    """One request's records from the inbox queue, and the Serve call that runs it (the
    front end's CoreCall).

    The call ends when the request did: with Refused if it was refused, raising if the
    router failed, else None; its records may still be on the wire then (two paths), so a
    normal end only starts a grace period for them."""

    def __init__(self, inbox: OutputInbox, stream: int, queue: asyncio.Queue, response, version):
        self.inbox, self.stream, self.queue, self.response = inbox, stream, queue, response
        self.version = version
        self.reporter: _Reporter | None = None  # set once the first token is here
        self.call = asyncio.ensure_future(_result(response))
        self.call.add_done_callback(lambda _: queue.put_nowait(None))  # wakes next()
        self.deadline: float | None = None
        self._first: list[EngineOutput] | None = None
        self._error: BaseException | None = None

    async def first(self) -> None:
        """Wait for the first records (next() hands them out)."""
        self._first = await self._read()

    async def next(self) -> list[EngineOutput]:
        """What arrived since the last call; raises the request's error."""
        if self._first is not None:
            outs, self._first = self._first, None
            return outs
        try:
            return await self._read()
        except Exception as e:
            self._error = e
            raise

    async def _read(self) -> list[EngineOutput]:
        records = [await self._get()]
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if item is not None:
                records.append(item)
        outs = []
        for record in records:
            if isinstance(record, ErrorRecord):
                raise record.error
            outs.append(record.output)
        return outs

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

    def abort(self, request_ids: list[str]) -> None:
        """Over the output channel, to the router that runs them."""
        self.inbox.abort(self.stream, request_ids)

    def close(self, finished: bool) -> None:
        """The stream is over: free its inbox slot and report the outcome to the version
        split; an unfinished request's call is cancelled, which aborts it on the router."""
        self.inbox.close(self.stream)
        if self.reporter is not None:
            if self._error is not None:
                self.reporter.done(ok=_client_error(self._error))
            elif finished:
                self.reporter.done(ok=True)
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
        adapters = AdapterRollouts()  # the front end's adapter splits, polled with the versions
        served = {name: str(path) for name, path in self.config.lora.adapters.items()}
        versions = TrafficSplit(base.name, self.router, controller, adapters, served)
        await versions.refresh()
        versions.start()
        inbox = OutputInbox(ray.util.get_node_ip_address())
        await inbox.start()
        tokenizer = AutoTokenizer.from_pretrained(self.config.model)
        core = RouterCore(versions, inbox)
        client = FrontEnd(
            core, tokenizer, self.config.model_name, versions.base, info.max_model_len,
            self.config.lora.adapters, adapters, pinned=tuple(self.config.lora.pinned),
        )  # fmt: skip
        return create_app(
            client,
            api_keys=api_keys_from_env(self.config.api_key_env),
            stream_interval=self.config.streaming.stream_interval,
            unknown_fields=self.config.api.unknown_fields,
        )
