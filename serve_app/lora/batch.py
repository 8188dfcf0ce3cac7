"""Which adapter each row of a micro-batch runs, and the LoRA deltas over those rows.

The model runner builds one LoraBatch per micro-batch (one adapter or none per request, so per
row); the decoder makes it the active batch while that micro-batch's layers run
(`active_batch`), and the places that apply an adapter ask for it: `project()` for the
linears, the MoE gate, the in-process experts. With no adapter in the step there is no batch
and nothing is added.

Each row's adapter slot (`slot_of_row`) is worked out once per micro-batch, here, not per
module. On the CPU in float32 with the kernels built, a module's delta over every row is one
call of serve_app/kernels/lora.py (BGMV: each row gathers its adapter's factors, and for
routed experts its expert's), over factors packed once per adapter (B transposed) and kept
while the adapter lives. Elsewhere (or MOESERVE_CPU_KERNEL=0) torch ops: linears add
(x @ A.T) @ B.T per adapter group (a slice when its rows are contiguous, the usual case: the
runner keeps a request's rows together), as vLLM's CPU punica path does
(`vllm/lora/ops/torch_ops/lora_ops.py`); experts gather per row.
Shapes: T rows, K in features, N out features, r rank, E experts.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from serve_app.kernels import lora as lora_kernel
from serve_app.lora.peft_format import ExpertLoraWeights, LoraAdapter, LoraWeights

_local = threading.local()
# id of an adapter's A tensor (per module) -> its kernel factors, dropped with that tensor (a
# plain dict and a finalizer: torch's WeakIdKeyDictionary cost ~3 us a lookup, 8 a module)
_packed: dict[int, lora_kernel.Factors] = {}


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
        rows_of: list[list[int]] = []  # per slot, its rows
        for r, a in enumerate(per_row):
            if a is None:
                slots.append(-1)
                continue
            if id(a) not in index:
                index[id(a)] = len(adapters)
                adapters.append(a)
                rows_of.append([])
            slots.append(index[id(a)])
            rows_of[slots[-1]].append(r)
        slot_of_row = torch.tensor(slots, dtype=torch.int64, device=device)
        groups = []
        for a, rows in zip(adapters, rows_of, strict=True):
            if rows[-1] - rows[0] + 1 == len(rows):
                groups.append(_Group(a, slice(rows[0], rows[-1] + 1)))
            else:
                groups.append(_Group(a, torch.tensor(rows, dtype=torch.int64, device=device)))
        return cls(adapters, slot_of_row, groups)

    def add_linear_(
        self, name: str | None, x: torch.Tensor, y: torch.Tensor, rows: slice | None = None
    ) -> None:
        """y[rows] += (x[rows] @ A.T) @ B.T for each adapter that adapts module `name`.
        x [T, K], y [T, N] (a column slice of a wider output is fine); with `rows`, x and y
        hold only those rows of the micro-batch (MLA's expanded prefill chunk)."""
        if name is None:
            return
        slots = self.slot_of_row if rows is None else self.slot_of_row[rows]
        kernel = lora_kernel.load() if x.device.type == "cpu" else None
        if kernel is not None and kernel.applies(x, y):
            factors = [_factors(a.linears.get(name), kernel) for a in self.adapters]
            if all(f is None for f in factors):
                return
            if all(f is not False for f in factors):
                kernel.bgmv_(x, slots, None, factors, y)
                return
        groups = self._groups if rows is None else [
            _Group(a, (slots == i).nonzero().squeeze(1)) for i, a in enumerate(self.adapters)
        ]  # fmt: skip
        for g in groups:
            w = g.adapter.linears.get(name)
            if w is None:
                continue
            xs = x[g.rows]
            delta = (xs @ w.a.to(xs.dtype).T) @ w.b.to(xs.dtype).T
            y[g.rows] += delta.to(y.dtype)

    def linear_groups(self, name: str | None) -> list[tuple[LoraWeights, slice | torch.Tensor]]:
        """(factors, rows) of each adapter in the batch that adapts module `name`: for a
        module run in another form than its weight (MLA's absorbed kv_b_proj)."""
        if name is None:
            return []
        return [(w, g.rows) for g in self._groups if (w := g.adapter.linears.get(name)) is not None]

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
        slots, experts = self._rows_in_factors(proj, self.batch.slot_of_row[token_idx], expert_ids)
        kernel = lora_kernel.load() if x.device.type == "cpu" else None
        if kernel is not None and kernel.applies(x, y):
            factors = [_factors(a.experts.get((self.layer, proj)), kernel)
                       for a in self.batch.adapters]  # fmt: skip
            if all(f is not False for f in factors):
                kernel.bgmv_(x, slots, experts, factors, y)
                return
        for i, adapter in enumerate(self.batch.adapters):
            w = adapter.experts.get((self.layer, proj))
            if w is None:
                continue
            rows = (slots == i).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            y[rows] += _bgmv(x[rows], w, experts[rows]).to(y.dtype)

    def _rows_in_factors(
        self, proj: str, slots: torch.Tensor, expert_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each routed row's (slot, row of its adapter's factors): the global expert id, or
        through a packed slice's index (a shard's experts), where an expert without a row
        adds nothing (slot -1, as the base model)."""
        experts = expert_ids.contiguous()
        sliced = [
            (i, w.index)
            for i, a in enumerate(self.batch.adapters)
            if (w := a.experts.get((self.layer, proj))) is not None and w.index is not None
        ]
        if not sliced:
            return slots.contiguous(), experts
        slots, experts = slots.clone(), experts.clone()
        for i, index in sliced:
            mine = slots == i
            mapped = index[expert_ids[mine]]
            experts[mine] = mapped.clamp_min(0)
            slots[mine] = torch.where(mapped >= 0, i, -1)
        return slots, experts


def _bgmv(x: torch.Tensor, w: ExpertLoraWeights, experts: torch.Tensor) -> torch.Tensor:
    """Row j: (x[j] @ a[e_j].T) @ b[e_j].T, e_j = experts[j] (rows of a and b). x [n, K] ->
    [n, N]."""
    a = w.a.to(x.dtype)[experts]  # [n, r, K]
    b = w.b.to(x.dtype)[experts]  # [n, N, r]
    shrunk = torch.bmm(a, x[:, :, None])  # [n, r, 1]
    return torch.bmm(b, shrunk)[:, :, 0]


def _factors(
    w: LoraWeights | ExpertLoraWeights | None, kernel: lora_kernel.LoraKernels
) -> lora_kernel.Factors | None | bool:
    """w's kernel factors, packed on first use; None: no factors (the module is not adapted);
    False: a rank the kernel does not take (the caller runs torch)."""
    if w is None:
        return None
    if w.a.shape[-2] > kernel.max_rank:
        return False
    f = _packed.get(id(w.a))
    if f is None:
        f = _packed[id(w.a)] = lora_kernel.pack(w.a, w.b)
        # NOTE: the factors must not reference w.a itself (pack detaches), or it never dies
        weakref.finalize(w.a, _packed.pop, id(w.a), None)
    return f
