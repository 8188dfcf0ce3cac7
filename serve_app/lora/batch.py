"""Which adapter each row of a micro-batch runs, and the LoRA deltas over those rows.

The model runner builds one LoraBatch per micro-batch (one adapter or none per request, so per
row); the decoder makes it the active batch while that micro-batch's layers run
(`active_batch`), and the places that apply an adapter ask for it: `project()` for the
linears, the MoE gate, the in-process experts. With no adapter in the step there is no batch
and nothing is added.

Linears: rows are grouped by adapter once per micro-batch (a slice when they are
contiguous, which is the usual case: the runner keeps a request's rows together), and each
group adds (x @ A.T) @ B.T to its rows (vLLM's CPU punica path does the same with
torch ops, `vllm/lora/ops/torch_ops/lora_ops.py`). Experts: each routed row gathers its
expert's factors (BGMV over (adapter, expert)).
Shapes: T rows, K in features, N out features, r rank, E experts.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from serve_app.lora.peft_format import ExpertLoraWeights, LoraAdapter

_local = threading.local()


@contextmanager
def active_batch(batch: LoraBatch | None) -> Iterator[None]:
    """Make `batch` the one the model's layers apply while the block runs (this thread only:
    each engine steps on its own thread)."""
    previous = getattr(_local, "batch", None)
    _local.batch = batch
    try:
        yield
    finally:
        _local.batch = previous


def current() -> LoraBatch | None:
    return getattr(_local, "batch", None)


@dataclass(frozen=True, slots=True)
class _Group:
    adapter: LoraAdapter
    rows: slice | torch.Tensor  # the rows of the micro-batch that run this adapter


@dataclass(slots=True)
class LoraBatch:
    """Per micro-batch: adapters[i] runs where slot_of_row == i (-1: the base model)."""

    adapters: list[LoraAdapter]
    slot_of_row: torch.Tensor  # [T] int64
    _groups: list[_Group] = field(default_factory=list)

    @classmethod
    def build(cls, per_row: list[LoraAdapter | None], device: torch.device) -> LoraBatch | None:
        """From each row's adapter (None: base); None when no row has one."""
        if all(a is None for a in per_row):
            return None
        adapters: list[LoraAdapter] = []
        index: dict[int, int] = {}
        slots = []
        for a in per_row:
            if a is None:
                slots.append(-1)
                continue
            if id(a) not in index:
                index[id(a)] = len(adapters)
                adapters.append(a)
            slots.append(index[id(a)])
        slot_of_row = torch.tensor(slots, dtype=torch.int64, device=device)
        groups = []
        for i, a in enumerate(adapters):
            rows = [r for r, s in enumerate(slots) if s == i]
            if rows[-1] - rows[0] + 1 == len(rows):
                groups.append(_Group(a, slice(rows[0], rows[-1] + 1)))
            else:
                groups.append(_Group(a, torch.tensor(rows, dtype=torch.int64, device=device)))
        return cls(adapters, slot_of_row, groups)

    def add_linear_(self, name: str | None, x: torch.Tensor, y: torch.Tensor) -> None:
        """y[rows] += (x[rows] @ A.T) @ B.T for each adapter that adapts module `name`.
        x [T, K], y [T, N] (a column slice of a wider output is fine)."""
        if name is None:
            return
        for g in self._groups:
            w = g.adapter.linears.get(name)
            if w is None:
                continue
            xs = x[g.rows]
            delta = (xs @ w.a.to(xs.dtype).T) @ w.b.to(xs.dtype).T
            y[g.rows] += delta.to(y.dtype)

    def experts(self, layer: int) -> ExpertLora | None:
        """The routed experts' LoRA of `layer` in this batch, or None if no adapter has any."""
        if not any((layer, "gate_up") in a.experts or (layer, "down") in a.experts
                   for a in self.adapters):  # fmt: skip
            return None
        return ExpertLora(self, layer)


@dataclass(frozen=True, slots=True)
class ExpertLora:
    """One MoE layer's expert LoRA over the routed rows of one micro-batch."""

    batch: LoraBatch
    layer: int

    def add_(
        self, proj: str, x: torch.Tensor, token_idx: torch.Tensor, expert_ids: torch.Tensor,
        y: torch.Tensor,
    ) -> None:  # fmt: skip
        """y += the `proj` ("gate_up" / "down") delta of each routed row: row j is token
        token_idx[j]'s slot for global expert expert_ids[j]. x [n, K], y [n, N]."""
        slots = self.batch.slot_of_row[token_idx]
        for i, adapter in enumerate(self.batch.adapters):
            w = adapter.experts.get((self.layer, proj))
            if w is None:
                continue
            rows = (slots == i).nonzero().squeeze(1)
            experts = expert_ids[rows]
            if w.index is not None:  # a packed slice: experts without a row add nothing
                experts = w.index[experts]
                kept = experts >= 0
                rows, experts = rows[kept], experts[kept]
            if rows.numel() == 0:
                continue
            y[rows] += _bgmv(x[rows], w, experts).to(y.dtype)


def _bgmv(x: torch.Tensor, w: ExpertLoraWeights, experts: torch.Tensor) -> torch.Tensor:
    """Row j: (x[j] @ a[e_j].T) @ b[e_j].T, e_j = experts[j] (rows of a and b). x [n, K] ->
    [n, N]."""
    a = w.a.to(x.dtype)[experts]  # [n, r, K]
    b = w.b.to(x.dtype)[experts]  # [n, N, r]
    shrunk = torch.bmm(a, x[:, :, None])  # [n, r, 1]
    return torch.bmm(b, shrunk)[:, :, 0]
