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


def grammar_error_line(message: str) -> str:
    """A grammar engine's (llguidance's) error as one line: its `error:` line when it has one
    (a regex or Lark error comes with the source and a caret drawn below), else its first."""
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    tagged = [ln.removeprefix("error:").strip() for ln in lines if ln.startswith("error:")]
    return (tagged or lines or ["invalid"])[0]
