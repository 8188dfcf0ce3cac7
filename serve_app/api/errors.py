"""OpenAI's error shape: {"error": {"message", "type", "param", "code"}}, with HTTP statuses."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

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


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = loc[0] if loc else None  # the top-level field, as OpenAI reports it
        msg = f"{param}: {first.get('msg', 'invalid request')}" if param else "invalid request"
        return JSONResponse(error_body(msg, "invalid_request_error", 400, param), 400)

    @app.exception_handler(APIError)
    @app.exception_handler(EngineError)
    async def _engine(_: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)
