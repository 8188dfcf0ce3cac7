"""How much memory LoRA adapters may take from the KV pool (pure: shapes in, bytes out).

The reserve is taken out of the KV pool's budget before its blocks are allocated (vLLM and
S-LoRA reserve adapter memory the same way): adapters are budgeted against the KV cache, not on
top of it. Without an explicit budget, an engine serving adapters reserves `max_loras` times
the largest adapter the config allows on this model (at most half the pool's memory):
`max_lora_rank` x (in + out) x 4 bytes (float32 factors, as peft_format.py holds them) for
every module the model applies LoRA to, plus the routed experts' [E, r, in] / [E, out, r] per
MoE layer and projection where the experts are in this process (an adapter there may hold
them; elsewhere it is refused, so they are not counted).
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


def lora_budget_bytes(
    max_loras: int,
    largest: int,
    explicit_gb: float | None,
    serves_adapters: bool,
    kv_memory: float | None,
) -> int | None:
    """The resident adapters' byte budget (None: none, adapters held by count only).

    explicit_gb: exactly that. Else, like vLLM's `enable_lora`, only an engine that serves
    adapters from the start reserves: max_loras x the largest, at most half the KV pool's
    memory (`kv_memory`; None where the pool is an explicit block count, nothing to halve).
    NOTE: the cap keeps a default config starting on a large MoE, where the largest adapter
    (every expert at max_lora_rank) is hundreds of MiB; the registry still refuses an adapter
    that does not fit, naming the sizes.
    """
    if explicit_gb is not None:
        return int(explicit_gb * (1 << 30))
    if not serves_adapters:
        return None
    wanted = max_loras * largest
    return wanted if kv_memory is None else min(wanted, int(kv_memory // 2))
