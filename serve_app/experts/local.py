"""Experts held in this process: per layer, gate|up [E, D, 2I] and down [E, I, D] matrices.

Tokens are grouped by expert so each expert runs one batched matmul over all its tokens. The
weights are input-major (`x @ w`, not `F.linear(x, w)`: MKL runs the transposed form 2-4x
slower at the few tokens per expert of a decode step). On the CPU in float32 they are further
packed into column panels for the grouped kernel of serve_app/kernels/cpu.py, which
streams each expert's weights once per step; bigger groups (prefill) go to MKL only on CPUs
where the calibration found it faster (serve_app/kernels/tuning.py, docs/benchmarks.md).
Shapes: T tokens, K experts per token, E experts, D hidden, I expert intermediate size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from serve_app.kernels import cpu as cpu_kernel
from serve_app.lora import batch as lora_batch
from serve_app.lora.batch import ExpertLora
from serve_app.model.expert_executor import ExpertExecutor


class ExpertWeights:
    """The experts of one MoE layer, or of the subset of them a shard owns.

    `packed`: w13 is [E_local, 2I/P, D, P] and w2 [E_local, D/P, I, P] (cpu_kernel panels),
    else [E_local, D, 2I] and [E_local, I, D]. Either way dim 0 is the local expert, so
    concatenating or selecting experts works the same on both layouts.
    """

    __slots__ = ("w13", "w2", "expert_ids", "packed", "owned")

    def __init__(
        self, w13: torch.Tensor, w2: torch.Tensor, expert_ids: list[int], packed: bool = False
    ):
        self.w13 = w13
        self.w2 = w2
        self.expert_ids = expert_ids
        self.packed = packed
        # [max id + 2] bool: True at the ids held here; the last entry is the sentinel
        self.owned = torch.zeros(max(expert_ids) + 2, dtype=torch.bool, device=w13.device)
        self.owned[expert_ids] = True

    @classmethod
    def build(cls, w13: torch.Tensor, w2: torch.Tensor, expert_ids: list[int]) -> ExpertWeights:
        """From input-major [E, D, 2I] / [E, I, D]; packed when the CPU kernel applies."""
        if cpu_kernel.applies(w13) and cpu_kernel.applies(w2):
            return cls(cpu_kernel.pack(w13), cpu_kernel.pack(w2), expert_ids, packed=True)
        return cls(w13, w2, expert_ids)

    def with_experts(self, w13: torch.Tensor, w2: torch.Tensor, ids: list[int]) -> ExpertWeights:
        """Same layout, other experts (rebalancing adds and drops)."""
        return ExpertWeights(w13, w2, ids, self.packed)

    @property
    def intermediate_size(self) -> int:
        return self.w2.shape[2] if self.packed else self.w2.shape[1]

    def gate_up(self, xs: torch.Tensor, spans: list[tuple[int, int, int]]) -> torch.Tensor:
        """[n, 2I]: rows xs[s:e] through expert `local`'s gate and up for each span."""
        return _grouped_matmul(self.w13, self.packed, xs, spans)

    def down(self, act: torch.Tensor, spans: list[tuple[int, int, int]]) -> torch.Tensor:
        """[n, D]: rows act[s:e] through expert `local`'s down for each span."""
        return _grouped_matmul(self.w2, self.packed, act, spans)

    def mlp_into(self, xs, spans, row_weights, dest, slots) -> bool:
        """The whole MLP of every span's rows in one kernel call, row r times row_weights[r]
        written to slots[dest[r]]; False (nothing done) where that kernel does not apply."""
        if not self.packed or not _fused_applies(self, spans, xs):
            return False
        kernel = cpu_kernel.load()
        assert kernel is not None
        kernel.moe_mlp(xs, self.w13, self.w2, spans, row_weights, dest, slots)
        return True

    def concat(self, other: ExpertWeights) -> ExpertWeights:
        """These experts, then `other`'s (same layout)."""
        return self.with_experts(
            torch.cat([self.w13, other.w13]),
            torch.cat([self.w2, other.w2]),
            self.expert_ids + other.expert_ids,
        )

    def select(self, keep: list[int]) -> ExpertWeights:
        """The experts at local positions `keep`."""
        return self.with_experts(self.w13[keep], self.w2[keep], [self.expert_ids[i] for i in keep])

    @property
    def nbytes(self) -> int:
        return self.w13.nbytes + self.w2.nbytes


def run_experts(
    w: ExpertWeights,
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    lora: ExpertLora | None = None,
) -> torch.Tensor:
    """sum over k of weight * expert(x) for the experts in `w`; other experts contribute 0.
    With `lora`, each routed row adds its adapter's gate_up and down deltas (unfused path).

    An id of -1 marks a slot that another shard serves: it is skipped like any foreign expert.
    The (token, k) slots are sorted by expert and gathered once; each expert then runs its two
    matmuls on its contiguous rows, and the activation, the routing weights and the scatter
    back run once over all rows (per-expert small ops cost as much as the matmuls at decode).
    Where `w.mlp_into` applies (packed weights, no LoRA) the matmuls, the activation and the
    routing weights are one kernel call (one parallel region per layer).
    """
    k = topk_ids.shape[1]
    flat_ids = topk_ids.reshape(-1)
    sentinel = len(w.owned) - 1  # sorts after every owned expert
    clipped = flat_ids.clamp(0, sentinel)
    flat_ids = torch.where(w.owned[clipped] & (flat_ids >= 0), clipped, sentinel)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=sentinel + 1).tolist()
    n = len(order) - counts[sentinel]  # slots this layer's experts serve
    if n == 0:
        return torch.zeros_like(x)
    order, foreign = order[:n], order[n:]
    token_idx = order // k
    xs = x[token_idx]
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    spans = [
        (local, starts[expert], starts[expert + 1])
        for local, expert in enumerate(w.expert_ids)
        if starts[expert] < starts[expert + 1]
    ]
    row_weights = topk_weights.reshape(-1)[order].to(x.dtype).contiguous()
    # rows land in their (k, token) slot: summing the k planes replaces a scatter-add, which
    # torch runs row by row (~10% of a prefill step) or through a sort (a third of a quantized
    # decode step); planes, not [token, k] rows, so the sum is elementwise (a sum over the
    # middle dim cost 4% of a decode run)
    slots = x.new_empty(len(flat_ids), x.shape[1])
    if len(foreign):  # slots another shard serves add 0 here (only those rows are zeroed)
        slots.index_fill_(0, (foreign % k) * x.shape[0] + foreign // k, 0.0)
    dest = (order % k) * x.shape[0] + token_idx
    if lora is not None or not w.mlp_into(xs, spans, row_weights, dest, slots):
        inter = w.intermediate_size
        gate_up = w.gate_up(xs, spans)
        if lora is not None:
            experts = flat_ids[order]
            lora.add_("gate_up", xs, token_idx, experts, gate_up)
        act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        y = w.down(act, spans)
        if lora is not None:
            lora.add_("down", act, token_idx, experts, y)
        y *= row_weights[:, None]
        slots.index_copy_(0, dest, y)
    planes = slots.view(k, -1, x.shape[1])
    return planes[0] + planes[1] if k == 2 else planes.sum(0)


def _fused_applies(w: ExpertWeights, spans: list[tuple[int, int, int]], x: torch.Tensor) -> bool:
    """The one-region kernel runs when the gate and up halves split at a panel boundary and
    no group goes to MKL on this CPU (tuning.py)."""
    kernel = cpu_kernel.load()
    if kernel is None or x.dtype != torch.float32 or w.intermediate_size % cpu_kernel.PANEL:
        return False
    limit = kernel.blocking.mkl_rows
    return not limit or all(e - s <= limit for _, s, e in spans)


def _grouped_matmul(
    w: torch.Tensor, packed: bool, xs: torch.Tensor, spans: list[tuple[int, int, int]]
) -> torch.Tensor:
    """Rows xs[s:e] times expert `local`'s matrix for each (local, s, e) span -> [n, N]."""
    if not packed:
        out = xs.new_empty(xs.shape[0], w.shape[2])
        for local, s, e in spans:
            torch.mm(xs[s:e], w[local], out=out[s:e])
        return out
    out = xs.new_empty(xs.shape[0], w.shape[1] * w.shape[3])
    kernel = cpu_kernel.load()
    assert kernel is not None, "packed weights without the kernel"
    # groups above mkl_rows run torch matmuls where those are faster on this CPU (tuning.py)
    limit = kernel.blocking.mkl_rows or xs.shape[0]
    small = [sp for sp in spans if sp[2] - sp[1] <= limit]
    if small:
        kernel.grouped_mm(xs, w, small, out)
    for local, s, e in spans:
        if e - s > limit:
            out[s:e] = cpu_kernel.panel_matmul(xs[s:e], w[local])
    return out


class LocalExperts(ExpertExecutor):
    """All experts of all MoE layers, in this process."""

    def __init__(self, layers: dict[int, ExpertWeights]):
        self.layers = layers

    def forward(
        self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        batch = lora_batch.current()
        adapters = None if batch is None else batch.experts(layer)
        return run_experts(self.layers[layer], x, topk_ids, topk_weights, adapters)

    def weight_bytes(self) -> int:
        return sum(w.nbytes for w in self.layers.values())
