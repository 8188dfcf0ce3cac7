"""The cap on distinct LoRA adapters per step (`max_loras_per_batch`), with fairness. No torch.

Why a cap: each distinct adapter in a step is one more group of shrink / expand matmuls per
adapted module (serve_app/lora/batch.py), so a step's LoRA cost grows with the number of
adapters in it, not only with its rows. vLLM calls this cap `max_loras`, SGLang
`max_loras_per_batch`; our `max_loras` is the number held by the registry.

The rule, applied when the scheduler admits waiting requests (running requests keep their
slot; the base model never counts):
1. The adapters of the running requests form the step's set; it never holds more than the cap,
   so no step does. A waiting request of an adapter in the set, or of the base model, may be
   admitted; one of an adapter not in it only while the set has room.
2. A request held back by the cap is skipped for this step; requests behind it may go.
3. Fairness: the oldest held-back request counts the adapter requests admitted past it. Once
   `patience` have passed it, the set is closed: no further adapter request behind it is
   admitted (base-model requests still are) until it gets in. The running requests of the set
   then finish (each within its max_tokens), and the first adapter to drain frees the slot it
   takes, before any newer request can. So under any arrivals a held-back request waits at most
   `patience` admissions plus one drain. The scheduler uses max_num_seqs as the patience:
   about one batch's worth of requests may overtake it.

An adapter is told apart by its object (`id`), as LoraBatch groups rows: two revisions of one
name in flight are two adapters.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Protocol


class _HasLora(Protocol):
    request_id: str
    lora: object  # None: the base model


def adapter_key(req: _HasLora) -> int | None:
    return None if req.lora is None else id(req.lora)


class LoraCap:
    """One engine's cap. Per step: begin() with the running requests, then admits() for each
    waiting request in FCFS order and admitted() for each one the scheduler takes."""

    def __init__(self, max_per_step: int, patience: int):
        if max_per_step < 1:
            raise ValueError(f"max_loras_per_batch must be >= 1, got {max_per_step}")
        if patience < 0:
            raise ValueError(f"patience must be >= 0, got {patience}")
        self.max_per_step = max_per_step
        self.patience = patience
        # request id of a held-back request -> adapter requests admitted past it while it was
        # the oldest held back (kept across steps until it is admitted or finishes)
        self.overtaken: dict[str, int] = {}
        self._running: Counter[int] = Counter()
        self._oldest_blocked: str | None = None  # this step's
        self._closed = False

    def begin(self, running: Iterable[_HasLora]) -> None:
        self._running = Counter(k for r in running if (k := adapter_key(r)) is not None)
        self._oldest_blocked = None
        self._closed = False

    def admits(self, req: _HasLora) -> bool:
        key = adapter_key(req)
        if key is None:
            return True
        if self._closed:
            return False
        if key in self._running or len(self._running) < self.max_per_step:
            return True
        if self._oldest_blocked is None:
            self._oldest_blocked = req.request_id
            self._closed = self.overtaken.get(req.request_id, 0) >= self.patience
        return False

    def admitted(self, req: _HasLora) -> None:
        key = adapter_key(req)
        if key is None:
            return
        self._running[key] += 1
        self.overtaken.pop(req.request_id, None)
        if self._oldest_blocked is not None:
            self.overtaken[self._oldest_blocked] = self.overtaken.get(self._oldest_blocked, 0) + 1

    def forget(self, request_id: str) -> None:
        """The request finished or was aborted while waiting."""
        self.overtaken.pop(request_id, None)
