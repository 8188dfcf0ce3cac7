"""DecodeClock: decode tok/s of a batch submitted at once, with the prefill left out.

The clock starts at the step in which the last request of the batch got its first token (all
prompts prefilled) and counts only the tokens of the steps after it, so the rate is the
steady-state decode of `batch` sequences. Pure: the caller passes the times in.
NOTE: serve_app/bench/vllm_worker.py keeps a copy of this logic (it may import nothing of
ours); change both together.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple


class DecodeTiming(NamedTuple):
    decode_tokens: int  # tokens produced after every request had its first
    decode_s: float  # from that step to the last
    prefill_s: float  # from submission to every request's first token
    total_tokens: int


class DecodeClock:
    def __init__(self, num_requests: int, t_submit: float):
        if num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {num_requests}")
        self.num_requests = num_requests
        self.t_submit = t_submit
        self.t_first: float | None = None
        self.t_last: float | None = None
        self._started: set[str] = set()
        self.decode_tokens = 0
        self.total_tokens = 0

    def step(self, now: float, new_tokens: Iterable[tuple[str, int]]) -> None:
        """One engine step's (request id, tokens it produced), taken at `now`."""
        produced = 0
        for rid, n in new_tokens:
            produced += n
            if n > 0:
                self._started.add(rid)
        self.total_tokens += produced
        if self.t_first is None:
            if len(self._started) >= self.num_requests:
                self.t_first = now
        elif produced:
            self.decode_tokens += produced
            self.t_last = now

    def result(self) -> DecodeTiming:
        if self.t_first is None:
            raise RuntimeError("not every request produced a token")
        last = self.t_last if self.t_last is not None else self.t_first
        return DecodeTiming(
            self.decode_tokens, last - self.t_first, self.t_first - self.t_submit, self.total_tokens
        )
