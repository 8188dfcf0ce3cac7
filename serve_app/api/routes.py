"""The OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions, /health,
/tokenize, /detokenize. They talk to an EngineClient, so the same app runs in-process or as the
Serve ingress."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import get_args

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2 import TemplateError

from serve_app.api import render
from serve_app.api.adapters import LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from serve_app.api.checked import checked_model_names
from serve_app.api.client import EngineClient, RouteHint, Submitted
from serve_app.api.errors import APIError, error_body, error_response, install_error_handlers
from serve_app.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    StreamOptions,
    UnknownFields,
)
from serve_app.api.streaming import every_n_tokens, merge_streams, sse
from serve_app.api.submit import discard, submit_all
from serve_app.api.tokenize import DetokenizeRequest, TokenizeRequest
from serve_app.engine.errors import InvalidRequestError
from serve_app.engine.outputs import LoraRef, RequestOutput
from serve_app.metrics.http import (
    install_metrics,
    observe_stream,
    set_request_adapter,
    set_request_version,
)
from serve_app.rollout.adapter import ADAPTER_PIN_HEADER
from serve_app.rollout.split import PIN_HEADER, SESSION_HEADER, session_key

# every body the routes take
RequestBody = CompletionRequest | ChatCompletionRequest | TokenizeRequest | DetokenizeRequest


def api_keys_from_env(name: str = "MOESERVE_API_KEY") -> frozenset[str]:
    """The environment variable `name` (the app config's api_key_env): one key or a
    comma-separated list. Unset = no auth."""
    raw = os.environ.get(name, "")
    return frozenset(k.strip() for k in raw.split(",") if k.strip())


def create_app(
    client: EngineClient,
    api_keys: frozenset[str] | None = None,
    stream_interval: int = 1,
    unknown_fields: UnknownFields = "reject",
) -> FastAPI:
    """stream_interval: tokens per streamed chunk after the first (vLLM's --stream-interval).
    unknown_fields: a request field the server does not know is a 400 (`reject`, as OpenAI)
    or ignored (`ignore`, as vLLM)."""
    if stream_interval < 1:
        raise ValueError(f"stream_interval must be >= 1, got {stream_interval}")
    if unknown_fields not in get_args(UnknownFields):
        choices = get_args(UnknownFields)
        raise ValueError(f"unknown_fields: one of {choices}, got {unknown_fields!r}")
    app = FastAPI(title="moeserve", version="0.1.0")
    install_error_handlers(app)
    keys = api_keys_from_env() if api_keys is None else api_keys
    app.include_router(build_api_routes(client, keys, stream_interval, unknown_fields))
    install_metrics(app, version=client.version)  # GET /metrics; times the routes above
    if unknown_fields == "reject":
        _close_request_schemas(app)
    return app


def _close_request_schemas(app: FastAPI) -> None:
    """/openapi.json as a rejecting server answers: the request bodies admit no field beyond
    their declared ones (the models allow extras only to name them in the 400)."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schemas = build()["components"]["schemas"]
            for name in checked_model_names() & schemas.keys():  # the bodies and their objects
                schemas[name]["additionalProperties"] = False
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build_api_routes(
    client: EngineClient,
    api_keys: frozenset[str],
    stream_interval: int = 1,
    unknown_fields: UnknownFields = "reject",
) -> APIRouter:
    async def authorize(request: Request) -> None:
        if not api_keys:
            return
        auth = request.headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not any(secrets.compare_digest(token, k) for k in api_keys):
            raise APIError(401, "invalid or missing API key", "authentication_error")

    def check_model(name: str | None) -> LoraRef | None:
        """The adapter `name` picks (None: the base model); a 404 for an unknown one."""
        return client.adapters.resolve(name)

    def check_body(body: RequestBody) -> LoraRef | None:
        lora = check_model(body.model)
        if unknown_fields == "reject" and (names := body.unknown_keys()):
            s = "s" if len(names) > 1 else ""  # OpenAI's wording
            raise InvalidRequestError(
                f"Unrecognized request argument{s} supplied: {', '.join(names)}", names[0]
            )
        return lora

    async def authorize_admin(request: Request) -> None:
        """Loading and unloading adapters change what the server runs: only with a key."""
        if not api_keys:
            raise APIError(
                403,
                "loading LoRA adapters at run time needs an API key (set MOESERVE_API_KEY)",
                "permission_error",
            )
        await authorize(request)

    routes = APIRouter()
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @routes.get("/health")
    async def health() -> JSONResponse:
        h = await client.health()
        return JSONResponse(h, status_code=200 if h.get("status") == "ok" else 503)

    def model_card() -> dict:
        return {
            "id": client.model_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "moeserve",
            "root": client.model_name,
            "parent": None,
            "max_model_len": client.max_model_len,
        }

    @v1.get("/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [model_card(), *client.adapters.cards(client.max_model_len)],
        }

    @v1.get("/models/{model:path}")
    async def model(model: str) -> dict:
        """OpenAI's retrieve: the served model's card, a 404 in OpenAI's shape for another id."""
        lora = check_model(model)
        if lora is None:
            return model_card()
        return next(c for c in client.adapters.cards(client.max_model_len) if c["id"] == lora.name)

    @v1.post("/load_lora_adapter", dependencies=[Depends(authorize_admin)])
    async def load_lora_adapter(body: LoadLoraAdapterRequest) -> dict:
        await client.load_adapter(body.lora_name, body.lora_path, body.pinned)
        return {"object": "lora_adapter", "id": body.lora_name, "loaded": True}

    @v1.post("/unload_lora_adapter", dependencies=[Depends(authorize_admin)])
    async def unload_lora_adapter(body: UnloadLoraAdapterRequest) -> dict:
        await client.unload_adapter(body.lora_name)
        return {"object": "lora_adapter", "id": body.lora_name, "loaded": False}

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        lora = check_body(body)
        if lora is not None:
            set_request_adapter(request, lora.name)
        params = body.to_sampling_params()
        rid = _request_id(request, "cmpl")
        hint = _route_hint(request, body.user, rid, lora)
        submitted = await submit_all(client, body.prompts(), params, rid, hint)
        kind = render.Completion(
            rid,
            _served(client, lora, body.model),
            client.tokenizer,
            params.n,
            body.echo,
            body.prompt_only,
        )
        return await _respond(
            request, body.stream, body.stream_opts, submitted, kind, stream_interval
        )

    @v1.post("/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        lora = check_body(body)
        if lora is not None:
            set_request_adapter(request, lora.name)
        params = body.to_sampling_params()
        ids = _apply_chat_template(client, body)
        rid = _request_id(request, "chatcmpl")
        hint = _route_hint(request, body.user, rid, lora)
        submitted = await client.submit(ids, params, rid, hint)
        kind = render.Chat(
            rid,
            _served(client, lora, body.model),
            client.tokenizer,
            params.n,
            body.parses_tool_calls,
            body.tool_calls_finish_reason,
        )
        return await _respond(
            request, body.stream, body.stream_opts, [submitted], kind, stream_interval
        )

    @routes.post("/tokenize", dependencies=[Depends(authorize)])
    async def tokenize(body: TokenizeRequest) -> dict:
        check_body(body)
        tok = client.tokenizer
        if body.messages is not None:
            tokens = _apply_chat_template(client, body.chat_request(), body.special_tokens())
        elif body.prompt is not None:
            tokens = tok.encode(body.prompt, add_special_tokens=body.special_tokens())
        else:
            raise InvalidRequestError("either prompt or messages is required", "prompt")
        out = {"tokens": tokens, "count": len(tokens), "max_model_len": client.max_model_len}
        if body.return_token_strs:
            out["token_strs"] = tok.convert_ids_to_tokens(tokens)
        return out

    @routes.post("/detokenize", dependencies=[Depends(authorize)])
    async def detokenize(body: DetokenizeRequest) -> dict:
        check_body(body)
        vocab = len(client.tokenizer)
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"token ids outside [0, {vocab}): {bad[:5]}", "tokens")
        return {"prompt": client.tokenizer.decode(body.tokens)}

    routes.include_router(v1)
    return routes


def _request_id(request: Request, prefix: str) -> str:
    given = request.headers.get("x-request-id")
    return f"{prefix}-{given or uuid.uuid4().hex}"


def _route_hint(
    request: Request, user: str | None, request_id: str, lora: LoraRef | None = None
) -> RouteHint:
    """Sticky per session (the `user` field, else x-session-id), else per request: all prompts
    of one request go to one version."""
    session = session_key(user, request.headers.get(SESSION_HEADER))
    pinned = request.headers.get(PIN_HEADER) or None
    adapter_pinned = request.headers.get(ADAPTER_PIN_HEADER) or None
    return RouteHint(
        session_key=session or request_id,
        pinned=pinned,
        session=session,
        lora=lora,
        adapter_pinned=adapter_pinned,
    )


def _served(client: EngineClient, lora: LoraRef | None, asked: str | None) -> str:
    """The `model` a response names: the adapter as the request named it, else the base."""
    return client.model_name if lora is None or asked is None else asked


def _apply_chat_template(
    client: EngineClient, body: ChatCompletionRequest, add_special_tokens: bool = False
) -> list[int]:
    """The prompt's token ids; the template writes its own special tokens unless asked."""
    tok = client.tokenizer
    if not getattr(tok, "chat_template", None):
        raise InvalidRequestError("this model has no chat template; use /v1/completions")
    kwargs = body.template_kwargs()
    # outside the try: their 400s name their own param, not "the template refused"
    messages, tools = body.chat_messages(), body.template_tools()
    try:
        text = tok.apply_chat_template(
            messages,
            tools=tools,
            add_generation_prompt=body.add_generation_prompt,
            tokenize=False,
            **kwargs,
        )
    except (ValueError, TemplateError) as e:  # the template refused these messages
        raise InvalidRequestError(
            f"the chat template refused the messages: {e}", "messages"
        ) from None
    return tok.encode(text, add_special_tokens=add_special_tokens)


async def _respond(
    request: Request,
    stream: bool,
    stream_opts: StreamOptions,
    submitted: list[Submitted],
    kind: render.Renderer,
    stream_interval: int = 1,
):
    streams = raw = [s.stream for s in submitted]
    if stream and stream_interval > 1:
        streams = [every_n_tokens(s, stream_interval) for s in streams]
    merged = observe_stream(request, merge_streams(streams))
    headers = None
    served = submitted[-1].version  # one per request, but a canary's failure retries on stable
    if served:
        headers = {PIN_HEADER: served}
        set_request_version(request, served)
    if stream:
        return EndingStreamingResponse(
            _sse_events(merged, kind, stream_opts),
            raw,
            media_type="text/event-stream",
            headers=headers,
        )
    # Non-streaming: stop work if the client goes away while we wait, or this task is cancelled.
    collect = asyncio.ensure_future(_collect(merged, kind))
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({collect, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not collect.done():
            collect.cancel()
            await asyncio.gather(collect, return_exceptions=True)
            await discard(raw)  # a collect cancelled before its first step never closed them
    if collect.cancelled():
        return JSONResponse(error_body("client disconnected", "aborted", 499), 499)
    return JSONResponse(collect.result(), headers=headers)


class EndingStreamingResponse(StreamingResponse):
    """A streamed response that ends its engine streams however it ends. NOTE: a client that
    leaves before the body starts never runs the body's own cleanup (Starlette does not close
    a body iterator it never started), which would leave the streams generating unread."""

    def __init__(self, content, streams: list[AsyncIterator[RequestOutput]], **kwargs):
        super().__init__(content, **kwargs)
        self._streams = streams

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await discard(self._streams)


async def _collect(merged, kind: render.Renderer) -> dict:
    async for i, out in merged:
        kind.accumulate(i, out)
    return kind.final()


async def _wait_disconnect(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.5)


async def _sse_events(merged, kind: render.Renderer, opts: StreamOptions):
    continuous = opts.include_usage and opts.continuous_usage_stats  # as vLLM reads it
    try:
        async for i, out in merged:
            for chunk in kind.chunks(i, out):
                if continuous:
                    chunk["usage"] = kind.usage()
                if opts.include_obfuscation:
                    chunk["obfuscation"] = _obfuscation()
                yield sse(chunk)
        if opts.include_usage:
            chunk = kind.usage_chunk()
            if opts.include_obfuscation:
                chunk["obfuscation"] = _obfuscation()
            yield sse(chunk)
    except Exception as e:  # noqa: BLE001 - headers are sent: report in-band
        resp = error_response(e)
        yield sse(resp.body.decode())
    finally:
        await merged.aclose()
    yield sse("[DONE]")


def _obfuscation() -> str:
    """OpenAI's stream obfuscation: 2 to 64 random characters, so that chunk sizes do not
    give away the lengths of the tokens they carry."""
    return secrets.token_hex(1 + secrets.randbelow(32))
