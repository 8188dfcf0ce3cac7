"""The front end's side of adapter rollouts: which version of an adapter serves a request, a
retry on the stable version when the candidate fails before its first token, and each
request's outcome for the analysis.

The splits come from the rollout controller (serve_app/rollout/adapter.py): the Serve ingress
polls them (deployments/versions.py), an in-process server or a test sets them with update().
Outcomes wait in `take_outcomes()` for whoever sends them to the controller.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from serve_app.api.client import CoreCall, RouteHint
from serve_app.api.errors import APIError, http_status
from serve_app.engine.errors import InvalidRequestError
from serve_app.engine.outputs import EngineOutput
from serve_app.rollout.adapter import (
    ADAPTER_PIN_HEADER,
    AdapterChoice,
    AdapterSplit,
    choose_adapter,
)
from serve_app.rollout.faults import InjectedFaultError
from serve_app.rollout.state import RolloutError
from serve_app.rollout.window import Outcome

MAX_PENDING = 10_000


def server_error(e: BaseException) -> bool:
    """A failure the error-rate gate counts (5xx); a client's own error (4xx) is not one."""
    return not isinstance(e, APIError) and http_status(e)[0] >= 500


class AdapterRollouts:
    """The adapter splits this front end routes by, public name -> AdapterSplit."""

    def __init__(self, rng: Callable[[], float] = random.random):
        self.splits: dict[str, AdapterSplit] = {}
        self.rng = rng  # draws the test-only injected faults
        self._pending: list[list] = []
        self._lock = threading.Lock()

    def update(self, splits: dict[str, AdapterSplit]) -> None:
        self.splits = dict(splits)

    def has(self, public: str) -> bool:
        return public in self.splits

    def choose(self, hint: RouteHint, request_id: str) -> AdapterChoice | None:
        """The version for a request naming an adapter under a rollout (None: not one)."""
        split = self.splits.get(hint.lora.name) if hint.lora is not None else None
        if split is None:
            return None
        try:
            return choose_adapter(split, hint.session_key, request_id, hint.adapter_pinned)
        except RolloutError as e:
            raise InvalidRequestError(str(e), ADAPTER_PIN_HEADER) from None

    def inject_fault(self, choice: AdapterChoice) -> None:
        """Test-only: fail as the version's fault_injection asks (before any token)."""
        if choice.error_rate and self.rng() < choice.error_rate:
            raise InjectedFaultError(f"fault injected in adapter version {choice.ref.name}")

    def report(self, public: str, outcome: Outcome) -> None:
        with self._lock:
            if len(self._pending) < MAX_PENDING:
                self._pending.append(replace(outcome, target=public).to_list())

    def take_outcomes(self) -> list[list]:
        """The outcomes since the last call, as Outcome.to_list() items."""
        with self._lock:
            batch, self._pending = self._pending, []
        return batch

    def watch(self, call: CoreCall, public: str, version: str, t0: float) -> CoreCall:
        return _ReportingCall(call, self, public, version, t0)


class _ReportingCall:
    """A CoreCall that reports its request's outcome (TTFT, end-to-end) when it closes."""

    def __init__(self, call: CoreCall, owner: AdapterRollouts, public: str, version: str, t0):
        self.call, self.owner, self.public, self.t0 = call, owner, public, t0
        self.adapter_version = version
        self.ttft_ms: float | None = None
        self.failed = False

    @property
    def version(self) -> str | None:
        """CoreCall's: the model version that took the request."""
        return self.call.version

    async def next(self) -> list[EngineOutput]:
        try:
            outs = await self.call.next()
        except Exception as e:
            self.failed = self.failed or server_error(e)
            raise
        if self.ttft_ms is None:
            self.ttft_ms = (time.monotonic() - self.t0) * 1000
        return outs

    def abort(self, request_ids: list[str]) -> None:
        self.call.abort(request_ids)

    def close(self, finished: bool) -> None:
        self.call.close(finished)
        if self.failed or finished:
            e2e = (time.monotonic() - self.t0) * 1000
            ok = not self.failed
            outcome = Outcome(self.adapter_version, ok, self.ttft_ms if ok else None, e2e)
            self.owner.report(self.public, outcome)
