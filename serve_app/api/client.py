"""What the HTTP layer needs from an engine, wherever the engine runs.

The in-process client (serve_app/tools/local_client.py) wraps AsyncLLMEngine; the Serve ingress
wraps a deployment handle. Nothing here imports the engine's torch side.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from serve_app.engine.outputs import RequestOutput
from serve_app.engine.request import SamplingParams


@dataclass(frozen=True, slots=True)
class RouteHint:
    """What decides a request's model version (see serve_app.rollout.split).

    session_key: the `user` field or x-session-id header (sticky split); pinned: the
    x-moeserve-version header; session: the client's own session key, if any (session_key falls
    back to the request id)."""

    session_key: str | None = None
    pinned: str | None = None
    session: str | None = None  # the session key only when the client gave one (replica affinity)


class Submitted(NamedTuple):
    """What submit returns: the request's outputs, and the model version that took it (None
    where there are no versions, in-process)."""

    stream: AsyncIterator[RequestOutput]
    version: str | None = None


class EngineClient(Protocol):
    model_name: str
    version: str  # the model version requests are labelled with unless routing picks another
    tokenizer: Any
    max_model_len: int

    async def submit(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str,
        hint: RouteHint | None = None,
    ) -> Submitted:
        """Validate and queue; raise InvalidRequestError & co. before returning the stream."""
        ...

    async def health(self) -> dict: ...
