"""The HTTP side: `/metrics`, and per-request metrics for the API routes.

An ASGI middleware times every API request from arrival to its last byte (the final SSE chunk
for streams) and counts it by status code; `observe_stream` wraps a request's engine output
stream for time to first token, time per output token and token counts. The middleware leaves a
`RequestMetrics` in the ASGI scope: whoever picks the model version of a request (a rollout)
sets its `version` there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import contextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import Response

from serve_app.metrics.recorder import Metrics, get_metrics

log = logging.getLogger(__name__)

SCOPE_KEY = "moeserve.metrics"
UNTIMED_ROUTES = frozenset({"/metrics", "/health"})  # probes would swamp the latency figures
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CLIENT_CLOSED = "499"  # nginx's code: the client went away before the last byte


@dataclass(slots=True)
class RequestMetrics:
    version: str
    start: float  # time.perf_counter() at arrival
    metrics: Metrics
    adapter: str | None = None  # the LoRA adapter the request ran (set by the routes)


def matched_route(scope) -> str | None:
    """The path template of the route that served the request (bounded, unlike raw paths);
    None for unmatched paths (404s) and the untimed probes."""
    path = getattr(scope.get("route"), "path", None)
    return None if path in UNTIMED_ROUTES else path


def install_metrics(
    app: FastAPI, version: str, metrics: Callable[[], Metrics] = get_metrics
) -> None:
    """Add GET /metrics and time the app's routes (call after the routes are added)."""

    async def metrics_page() -> Response:
        return Response(await metrics().backend.exposition(), media_type=CONTENT_TYPE)

    app.add_api_route("/metrics", metrics_page, methods=["GET"], include_in_schema=False)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics, version=version)


def set_request_adapter(request: Request, adapter: str) -> None:
    ctx = request.scope.get(SCOPE_KEY)
    if ctx is not None:
        ctx.adapter = adapter


def set_request_version(request: Request, version: str) -> None:
    ctx = request.scope.get(SCOPE_KEY)
    if ctx is not None:
        ctx.version = version


class RequestMetricsMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware), so streamed bodies pass through untouched."""

    def __init__(self, app, metrics: Callable[[], Metrics], version: str):
        self.app, self.metrics, self.version = app, metrics, version

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in UNTIMED_ROUTES:
            return await self.app(scope, receive, send)
        ctx = RequestMetrics(self.version, time.perf_counter(), self.metrics())
        scope[SCOPE_KEY] = ctx
        status: int | None = None
        done = False

        async def timed_send(message) -> None:
            nonlocal status, done
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                done = True
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            route = matched_route(scope)
            if route is not None:
                # no response started: it raised, and ServerErrorMiddleware answers 500
                code = "500" if status is None else str(status) if done else CLIENT_CLOSED
                labels = {"version": ctx.version, "route": route, "code": code}
                elapsed = time.perf_counter() - ctx.start
                with _never_fail():
                    ctx.metrics.inc("moeserve_requests_total", 1, **labels)
                    ctx.metrics.observe("moeserve_request_duration_seconds", elapsed, **labels)


async def observe_stream(request: Request, merged: AsyncIterator) -> AsyncIterator:
    """Pass (index, RequestOutput) pairs through; record TTFT, TPOT and tokens at the end.

    Records nothing for a request the middleware does not time."""
    ctx: RequestMetrics | None = request.scope.get(SCOPE_KEY)
    first = last = None
    prompt: dict[int, int] = {}
    generated: dict[tuple[int, int], int] = {}  # (prompt index, choice index) -> tokens
    try:
        async for i, out in merged:
            now = time.perf_counter()
            prompt.setdefault(i, len(out.prompt_token_ids))
            for c in out.outputs:
                if c.token_ids:
                    generated[i, c.index] = generated.get((i, c.index), 0) + len(c.token_ids)
                    first = first if first is not None else now
                    last = now
            yield i, out
    finally:
        await merged.aclose()
        route = matched_route(request.scope)
        if ctx is not None and route is not None:
            _record_generation(ctx, route, prompt, generated, first, last)


def _record_generation(ctx: RequestMetrics, route: str, prompt, generated, first, last) -> None:
    m = ctx.metrics
    with _never_fail():
        labels = {"version": ctx.version, "route": route}
        m.inc("moeserve_prompt_tokens_total", sum(prompt.values()), **labels)
        _record_tokens(ctx, "moeserve_", labels, generated, first, last)
        if ctx.adapter is not None:
            labels = {"version": ctx.version, "adapter": ctx.adapter}
            m.inc("moeserve_lora_requests_total", 1, **labels)
            _record_tokens(ctx, "moeserve_lora_", labels, generated, first, last)


def _record_tokens(ctx: RequestMetrics, prefix: str, labels: dict, generated, first, last) -> None:
    """Tokens generated, TTFT and TPOT under `prefix` (all requests, or per LoRA adapter)."""
    m = ctx.metrics
    m.inc(f"{prefix}generation_tokens_total", sum(generated.values()), **labels)
    if first is not None:
        m.observe(f"{prefix}time_to_first_token_seconds", first - ctx.start, **labels)
        longest = max(generated.values())
        if longest > 1:
            tpot = (last - first) / (longest - 1)
            m.observe(f"{prefix}time_per_output_token_seconds", tpot, **labels)


@contextmanager
def _never_fail():
    """A metric that cannot be recorded is logged; the request it describes is not harmed."""
    try:
        yield
    except Exception:  # noqa: BLE001
        log.warning("recording request metrics failed", exc_info=True)
