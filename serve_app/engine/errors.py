"""Typed engine errors. They say what went wrong, not how HTTP reports it: the API layer
(serve_app/api/errors.py) maps each to a status in OpenAI's error shape."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """The client's fault: bad parameters, empty or over-long prompt, unknown token ids."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param

    def __reduce__(self):  # keep `param` when the error crosses a process boundary
        return (type(self), (self.message, self.param))


class EngineOverloadedError(EngineError):
    """Too many requests queued; retry later."""


class EngineDeadError(EngineError):
    """The engine loop stopped after an internal failure."""


class ExpertsUnavailableError(EngineError):
    """An expert shard did not answer in time, even after a retry. The requests of that step
    fail; the engine keeps serving and the shard is re-resolved on the next call."""
