"""OpenAI's error shape: {"error": {"message", "type", "param", "code"}}, with HTTP statuses."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from serve_app.engine.errors import (
    EngineDeadError,
    EngineError,
    EngineOverloadedError,
    ExpertsUnavailableError,
    InvalidRequestError,
)
from serve_app.rollout.faults import InjectedFaultError

# Each typed engine error's HTTP status and OpenAI error type; the first match wins.
_STATUSES: tuple[tuple[type[EngineError], int, str], ...] = (
    (InvalidRequestError, 400, "invalid_request_error"),
    (EngineOverloadedError, 503, "service_unavailable"),
    (EngineDeadError, 503, "service_unavailable"),
    (ExpertsUnavailableError, 503, "service_unavailable"),
    (InjectedFaultError, 503, "service_unavailable"),
)


class APIError(Exception):
    """An error the API raises itself (unknown model, bad key)."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


def error_body(message: str, type_: str, status: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


def http_status(exc: BaseException) -> tuple[int, str]:
    """(status, OpenAI error type) of an engine error; 500 internal_error for anything else."""
    for cls, status, type_ in _STATUSES:
        if isinstance(exc, cls):
            return status, type_
    return 500, "internal_error"


def error_response(exc: Exception) -> JSONResponse:
    if isinstance(exc, APIError):
        return JSONResponse(error_body(exc.message, exc.type, exc.status, exc.param), exc.status)
    if isinstance(exc, InvalidRequestError):
        return JSONResponse(error_body(exc.message, "invalid_request_error", 400, exc.param), 400)
    if isinstance(exc, EngineError):
        status, type_ = http_status(exc)
        return JSONResponse(error_body(str(exc), type_, status), status)
    return JSONResponse(error_body("internal server error", "internal_error", 500), 500)


def field_path(loc: tuple | list) -> str | None:
    """A pydantic error location as OpenAI names a parameter: `tools[0].function.name`."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path or None


def validation_error(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) of a body that failed validation: the first error, with its path."""
    first = errors[0] if errors else {}
    loc = list(first.get("loc", ()))
    if loc[:1] == ["body"]:
        loc = loc[1:]
    if first.get("type") == "json_invalid":  # loc holds the byte offset, not a field
        why = (first.get("ctx") or {}).get("error", "invalid JSON")
        at = f" at position {loc[0]}" if loc and isinstance(loc[0], int) else ""
        return f"the request body is not valid JSON: {why}{at}", None
    param = field_path([p for p in loc if not _is_union_tag(p)])
    msg = first.get("msg", "invalid request")
    return (f"{param}: {msg}" if param else f"request body: {msg}"), param


def _is_union_tag(part: object) -> bool:
    """pydantic's name of a union member in a location (`list[int]`, `NamedToolChoice`,
    `function-after[...]`), which is no part of the request's path (fields are snake_case)."""
    return isinstance(part, str) and (part[:1].isupper() or any(c in part for c in "[]-"))


# OpenAI's type for the statuses Starlette raises itself (unknown route, wrong method...).
_HTTP_TYPES = {404: "not_found_error", 405: "method_not_allowed", 413: "invalid_request_error"}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        msg, param = validation_error(list(exc.errors()))
        return JSONResponse(error_body(msg, "invalid_request_error", 400, param), 400)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        status = exc.status_code
        if status == 404:  # OpenAI's wording for a route it does not have
            msg = f"Invalid URL ({request.method} {request.url.path})"
        elif status == 405:
            msg = f"Method {request.method} not allowed for {request.url.path}"
        else:
            msg = str(exc.detail)
        type_ = _HTTP_TYPES.get(
            status, "invalid_request_error" if status < 500 else "internal_error"
        )
        return JSONResponse(error_body(msg, type_, status), status, headers=exc.headers)

    @app.exception_handler(APIError)
    @app.exception_handler(EngineError)
    async def _engine(_: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)
