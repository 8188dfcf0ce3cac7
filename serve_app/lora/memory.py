"""How much memory LoRA adapters may take from the KV pool (pure: shapes in, bytes out).

The reserve is taken out of the KV pool's budget before its blocks are allocated (vLLM and
S-LoRA reserve adapter memory the same way): adapters are budgeted against the KV cache, not on
top of it. Without an explicit budget it is `max_loras` times the largest adapter the config
allows on this model: `max_lora_rank` x (in + out) x 4 bytes (float32 factors, as
peft_format.py holds them) for every module the model applies LoRA to, plus the routed
experts' [E, r, in] / [E, out, r] per MoE layer and projection where the experts are in this
process (an adapter there may hold them; elsewhere it is refused, so they are not counted).
"""

from __future__ import annotations

from serve_app.lora.peft_format import BaseShapes

FACTOR_BYTES = 4  # float32 A and B


def max_adapter_bytes(
    shapes: BaseShapes, targets: list[str], max_rank: int, experts_in_process: bool
) -> int:
    """Bytes of the largest adapter the registry accepts: rank `max_rank` on every target.

    NOTE: a separate gate and up pair is stacked as one rank-2r pair (peft_format.py) and the
    stacked rank is what max_rank bounds, so gate_up at max_rank is the largest it can be."""
    total = 0
    for module in targets:
        out_f, in_f = shapes.linears.get(module, (0, 0))
        total += max_rank * (in_f + out_f)
    if experts_in_process:
        for e, inter, hidden in shapes.experts.values():
            total += max_rank * e * (hidden + 2 * inter)  # gate_up: A [E, r, D], B [E, 2I, r]
            total += max_rank * e * (inter + hidden)  # down: A [E, r, I], B [E, D, r]
    return total * FACTOR_BYTES


def lora_budget_bytes(max_loras: int, largest: int, explicit_gb: float | None) -> int:
    """The resident adapters' byte budget: explicit GiB, else max_loras x the largest."""
    if explicit_gb is not None:
        return int(explicit_gb * (1 << 30))
    return max_loras * largest
