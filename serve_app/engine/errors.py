"""Typed engine errors. The API layer maps them to HTTP statuses in OpenAI's error shape."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""

    http_status = 500
    error_type = "internal_error"


class InvalidRequestError(EngineError, ValueError):
    """The client's fault: bad parameters, empty or over-long prompt, unknown token ids (400)."""

    http_status = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param

    def __reduce__(self):  # keep `param` when the error crosses a process boundary
        return (type(self), (self.message, self.param))


class EngineOverloadedError(EngineError):
    """Too many requests queued; retry later (HTTP 503)."""

    http_status = 503
    error_type = "service_unavailable"


class EngineDeadError(EngineError):
    """The engine loop stopped after an internal failure (HTTP 503)."""

    http_status = 503
    error_type = "service_unavailable"


class ExpertsUnavailableError(EngineError):
    """An expert shard did not answer in time, even after a retry (HTTP 503). The requests of
    that step fail; the engine keeps serving and the shard is re-resolved on the next call."""

    http_status = 503
    error_type = "service_unavailable"


class InjectedFaultError(EngineError):
    """A failure the version's test-only `fault_injection` asked for (HTTP 503)."""

    http_status = 503
    error_type = "service_unavailable"
