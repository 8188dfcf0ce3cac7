"""What the HTTP layer needs from an engine, wherever the engine runs.

EngineClient is what the routes call; the one implementation is the front end (api/frontend.py),
which does the text work over an EngineCore: the in-process one (serve_app/tools/local_client.py,
over AsyncLLMEngine) or the router replicas (serve_app/deployments/ingress.py, over Serve and
the output channel). Nothing here imports the engine's torch side.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from serve_app.engine.outputs import EngineOutput, EngineRequest, LoraRef, RequestOutput
from serve_app.engine.request import SamplingParams

if TYPE_CHECKING:  # adapters.py imports api.errors; no cycle at run time
    from serve_app.api.adapters import AdapterCatalog


@dataclass(frozen=True, slots=True)
class RouteHint:
    """What decides a request's model version (see serve_app.rollout.split).

    session_key: the `user` field or x-session-id header (sticky split); pinned: the
    x-moeserve-version header; session: the client's own session key, if any (session_key falls
    back to the request id)."""

    session_key: str | None = None
    pinned: str | None = None
    session: str | None = None  # the session key only when the client gave one (replica affinity)
    lora: LoraRef | None = None  # the LoRA adapter the request's `model` named (None: base)
    adapter_pinned: str | None = None  # x-moeserve-adapter-version: an adapter rollout's version


class Submitted(NamedTuple):
    """What submit returns: the request's outputs, and the model version that took it (None
    where there are no versions, in-process)."""

    stream: AsyncIterator[RequestOutput]
    version: str | None = None


class CoreCall(Protocol):
    """One request's sequences running in an engine core (token-in/token-out)."""

    version: str | None  # the model version that took it (None: in-process, no versions)

    async def next(self) -> list[EngineOutput]:
        """Every output that arrived since the last call (waits for one); raises the
        request's EngineError."""
        ...

    def abort(self, request_ids: list[str]) -> None:
        """Stop these sequences in the engine (a stop string ended them in the front end)."""
        ...

    def close(self, finished: bool) -> None:
        """The front end is done with the call; an unfinished one is aborted in the engine."""
        ...


class EngineCore(Protocol):
    """Where the front end sends a request's sequences."""

    async def add(
        self, request_id: str, requests: list[EngineRequest], hint: RouteHint
    ) -> CoreCall:
        """Queue request `request_id`'s sequences together; raise InvalidRequestError & co.
        if refused."""
        ...

    async def health(self) -> dict: ...

    async def load_adapter(self, ref: LoraRef) -> str | None:
        """Load (and so check) a LoRA adapter now; the reason it cannot be served, or None."""
        ...

    async def unload_adapter(self, ref: LoraRef) -> None:
        """Drop the adapter `ref` names, at its revision or older (a newer load stays)."""
        ...


class EngineClient(Protocol):
    model_name: str
    version: str  # the model version requests are labelled with unless routing picks another
    tokenizer: Any
    max_model_len: int
    adapters: AdapterCatalog  # the LoRA adapters served, by name (api/adapters.py)

    async def load_adapter(self, name: str, path: str, pinned: bool = False) -> None:
        """Load (or reload) a LoRA adapter and serve it as `name`, pinned or not
        (InvalidRequestError if it cannot be served)."""
        ...

    async def unload_adapter(self, name: str) -> None: ...

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """A prompt's token ids (a string tokenized: the one time for its request)."""
        ...

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
