"""Read a PEFT LoRA adapter directory into the low-rank factors the engine applies.

A PEFT LoRA directory holds `adapter_config.json` and `adapter_model.safetensors` (a pickled
`adapter_model.bin` is refused: nothing is unpickled). Its tensors are named
`base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r]; the module's
weight changes by delta = scaling * B @ A, with scaling = alpha / r (alpha / sqrt(r) under
rsLoRA) and r / alpha per module from `rank_pattern` / `alpha_pattern` (PEFT's own rule,
`peft.utils.other.get_pattern_key`: a pattern matches a module name that ends in it at a dot).

Expert layouts (what PEFT writes for MoE models):
- per-expert modules (`target_modules` on checkpoints whose experts are `experts.N.gate_proj`,
  `up_proj`, `down_proj`, or Mixtral's `w1`, `w3`, `w2`): 2-D factors per expert;
- 3-D expert parameters (`target_parameters: ["mlp.experts.gate_up_proj", ...]`, PEFT's
  `ParamWrapper`, transformers 5's fused experts): one `lora_A` [r * E, in] and `lora_B`
  [out, r * E] per parameter. Expert e's factors are A.view(E, r, in)[e] and
  B.view(out, r, E)[:, :, e] (`ParamWrapper.get_delta_weight`). Several parameters of one
  module nest, the first registered innermost, so the tensor names do not say which is which:
  `experts.base_layer.lora_A` (depth 1) is gate_up_proj and `experts.lora_A` (depth 0)
  down_proj when both are targeted.
Each expert projection becomes `ExpertLoraWeights` over the engine's fused layout, gate_up
[E, 2I, D] (gate rows first) and down [E, D, I]: separate gate and up factors are stacked as
one rank-2r factor pair, A = [A_gate; A_up] and B = blockdiag(B_gate, B_up).

The scaling is folded into B once here, so the engine computes (x @ A.T) @ B.T. Shapes are
checked against the base checkpoint (`BaseShapes`), so an adapter made for another model is a
LoraError naming the first tensor that does not fit, as is anything the engine does not apply
(DoRA, `modules_to_save`, biases, a rank above the maximum, a module it does not have).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# module . [base_layer. ...] lora_A|lora_B . weight
_KEY_RE = re.compile(r"^(?P<module>.+?)(?P<nest>(?:\.base_layer)*)\.lora_(?P<ab>[AB])\.weight$")
_EXPERT_MODULE_RE = re.compile(r"^model\.layers\.(\d+)\.(\w+)\.experts\.(\d+)\.(\w+)$")
_FUSED_EXPERTS_RE = re.compile(r"^model\.layers\.(\d+)\.(\w+)\.experts$")
_MOE_BLOCK_RE = re.compile(r"^(model\.layers\.\d+)\.mlp\.")
# per-expert projection name -> (fused projection, half: 0 gate / 1 up / None whole)
_PER_EXPERT = {
    "gate_proj": ("gate_up", 0),
    "w1": ("gate_up", 0),
    "up_proj": ("gate_up", 1),
    "w3": ("gate_up", 1),
    "down_proj": ("down", None),
    "w2": ("down", None),
}
# 3-D parameters of a fused experts module, in the order transformers registers them
_FUSED_PARAMS = ("gate_up_proj", "down_proj")
# config keys whose non-default value asks for something the engine does not apply
_REFUSED = {
    "use_dora": (False, None),
    "modules_to_save": (None, []),
    "bias": ("none",),
    "lora_bias": (False,),
    "fan_in_fan_out": (False,),
    "layer_replication": (None,),
    "trainable_token_indices": (None,),
    "alora_invocation_tokens": (None,),
    "use_qalora": (False, None),
}


class LoraError(ValueError):
    """An adapter the engine cannot serve; the message names the first reason (one line)."""


@dataclass(frozen=True, slots=True)
class LoraWeights:
    """One linear's update: delta W = b @ a (scaling folded into b)."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]


@dataclass(frozen=True, slots=True)
class ExpertLoraWeights:
    """One layer's routed experts, one fused projection: delta W_e = b[e] @ a[e].

    Dense (`index` None): row e is global expert e. Packed (an expert shard's slice): only the
    experts it holds that the adapter changes have rows, and index[e] is expert e's row, -1
    where it has none (that expert's delta is zero here), so a shard holds what its experts
    really carry of the adapter and nothing per expert it does not own.
    """

    a: torch.Tensor  # [E, r, in] (packed: [E_kept, r, in])
    b: torch.Tensor  # [E, out, r] (packed: [E_kept, out, r])
    index: torch.Tensor | None = None  # [E] int64: global expert -> row, -1: none

    def select(self, experts: list[int]) -> ExpertLoraWeights | None:
        """The packed slice of `experts` (global ids) with a non-zero update; None if none."""
        assert self.index is None, "select() cuts a dense adapter"
        e = self.a.shape[0]
        ids = [i for i in experts if i < e]
        changed = [i for i in ids if bool(self.a[i].any()) and bool(self.b[i].any())]
        if not changed:
            return None
        index = torch.full((e,), -1, dtype=torch.int64)
        index[changed] = torch.arange(len(changed))
        return ExpertLoraWeights(self.a[changed].contiguous(), self.b[changed].contiguous(), index)


@dataclass(frozen=True, slots=True)
class BaseShapes:
    """What the base checkpoint holds: linear weights by module name -> (out, in), and per MoE
    layer its routed experts' (E, I, D) (gate_up is [E, 2I, D], down [E, D, I]).
    `moe_module` is the checkpoint's name of the MoE block (Mixtral: block_sparse_moe)."""

    linears: dict[str, tuple[int, int]]
    experts: dict[int, tuple[int, int, int]]
    moe_module: str | None = "mlp"

    def checkpoint_module(self, module: str) -> str:
        """An adapter's module name under the checkpoint's names. transformers 5 calls every
        MoE block `mlp` (it renames Mixtral's block_sparse_moe on load), so PEFT on it names
        Mixtral's gate `model.layers.N.mlp.gate`; PEFT on transformers 4 used the checkpoint's
        name. A name the checkpoint has is kept."""
        if module in self.linears or self.moe_module in (None, "mlp"):
            return module
        renamed = _MOE_BLOCK_RE.sub(rf"\1.{self.moe_module}.", module)
        return renamed if renamed in self.linears else module


@dataclass(frozen=True)
class LoraAdapter:
    """A loaded adapter. `digest` is over its config and tensors (not its name or path): the
    prefix cache keys blocks by it, so a reload with new weights never reuses old KV."""

    name: str
    path: str
    digest: str
    rank: int  # the largest rank of any module (an expert pair of gate and up counts 2r)
    linears: dict[str, LoraWeights] = field(default_factory=dict)
    experts: dict[tuple[int, str], ExpertLoraWeights] = field(default_factory=dict)
    # (layer, projection) of expert LoRA applied elsewhere (by the expert shards, from their
    # own slices): a router over remote experts keeps which, not the factors
    experts_elsewhere: frozenset[tuple[int, str]] = frozenset()

    def adapts_experts(self, layer: int) -> bool:
        """Whether the adapter changes routed experts of `layer` (here or on the shards)."""
        keys = ((layer, "gate_up"), (layer, "down"))
        return any(k in self.experts or k in self.experts_elsewhere for k in keys)

    @property
    def nbytes(self) -> int:
        ts = [t for w in self.linears.values() for t in (w.a, w.b)]
        ts += [t for w in self.experts.values() for t in (w.a, w.b)]
        return sum(t.numel() * t.element_size() for t in ts)


def pattern_value(patterns: dict[str, float], module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup (`get_pattern_key`): the first pattern that
    matches the end of the module name at a dot boundary."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_config(path: Path) -> dict:
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise LoraError(f"LoRA adapter {path}: no {CONFIG_FILE}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise LoraError(f"LoRA adapter {path}: {CONFIG_FILE} is not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise LoraError(f"LoRA adapter {path}: {CONFIG_FILE} is not a JSON object")
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise LoraError(f"LoRA adapter {path}: peft_type {peft_type} is not LORA")
    for key, allowed in _REFUSED.items():
        if cfg.get(key, allowed[0]) not in allowed:
            raise LoraError(f"LoRA adapter {path}: {key}={cfg[key]!r} is not supported")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or cfg[key] <= 0:
            raise LoraError(f"LoRA adapter {path}: {key} must be a positive number")
    return cfg


def load_adapter(name: str, path: str | Path, base: BaseShapes, max_rank: int) -> LoraAdapter:
    """Read, check and convert one PEFT adapter directory (see the module docstring)."""
    path = Path(path)
    if not path.is_dir():
        raise LoraError(f"LoRA adapter {name}: {path} is not a directory")
    cfg = read_config(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        pickled = (path / "adapter_model.bin").exists()
        extra = " (adapter_model.bin is pickle: not loaded)" if pickled else ""
        raise LoraError(f"LoRA adapter {path}: no {WEIGHTS_FILE}{extra}")
    pairs, digest = _read_pairs(path, weights, cfg)
    linears: dict[str, LoraWeights] = {}
    per_expert: dict[tuple[int, str], dict[tuple[int, int | None], LoraWeights]] = {}
    fused: dict[int, dict[int, LoraWeights]] = {}  # layer -> depth -> 3-D factors
    for (module, depth), (a, b) in pairs.items():
        scaled = LoraWeights(a, b * _scaling(cfg, module, a.shape[0], path))
        fm = _FUSED_EXPERTS_RE.match(module)
        em = _EXPERT_MODULE_RE.match(module)
        if fm is not None:
            fused.setdefault(int(fm.group(1)), {})[depth] = scaled
        elif em is not None and em.group(4) in _PER_EXPERT:
            layer, expert, proj = int(em.group(1)), int(em.group(3)), em.group(4)
            target, half = _PER_EXPERT[proj]
            per_expert.setdefault((layer, target), {})[(expert, half)] = scaled
        elif depth:
            raise LoraError(f"LoRA adapter {path}: nested LoRA on {module} is not supported")
        else:
            module = base.checkpoint_module(module)
            linears[module] = _checked_linear(path, module, scaled, base)
    experts = {key: _stack_per_expert(path, key, parts, base) for key, parts in per_expert.items()}
    for layer, by_depth in fused.items():
        for key, w in _split_fused(path, cfg, layer, by_depth, base).items():
            if key in experts:
                raise LoraError(f"LoRA adapter {path}: layer {layer} {key[1]} adapted twice")
            experts[key] = w
    ranks = [w.a.shape[0] for w in linears.values()] + [w.a.shape[1] for w in experts.values()]
    rank = max(ranks, default=0)
    if rank == 0:
        raise LoraError(f"LoRA adapter {path}: no LoRA tensors")
    if rank > max_rank:
        raise LoraError(f"LoRA adapter {path}: rank {rank} is above the maximum {max_rank}")
    return LoraAdapter(name, str(path), digest, rank, linears, experts)


def _read_pairs(path: Path, weights: Path, cfg: dict):
    """{(module, nesting depth): (A, B)} in float32, and the adapter's content digest."""
    h = hashlib.sha256()
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    halves: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    try:
        f = safe_open(str(weights), framework="pt")
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise LoraError(f"LoRA adapter {path}: {WEIGHTS_FILE} is unreadable ({e})") from e
    with f:
        for key in sorted(f.keys()):
            m = _KEY_RE.match(key[len(_PREFIX) :] if key.startswith(_PREFIX) else key)
            if m is None:
                raise LoraError(f"LoRA adapter {path}: tensor {key} is not a LoRA A/B weight")
            t = f.get_tensor(key)
            if t.ndim != 2 or not t.is_floating_point():
                raise LoraError(f"LoRA adapter {path}: {key} must be a 2-D float tensor")
            h.update(key.encode())
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
            depth = m.group("nest").count(".base_layer")
            halves.setdefault((m.group("module"), depth), {})[m.group("ab")] = t.float()
    pairs = {}
    for (module, depth), ab in halves.items():
        if set(ab) != {"A", "B"}:
            raise LoraError(f"LoRA adapter {path}: {module} has lora_A or lora_B missing")
        a, b = ab["A"], ab["B"]
        if a.shape[0] != b.shape[1]:
            raise LoraError(
                f"LoRA adapter {path}: {module} lora_A {tuple(a.shape)} and lora_B "
                f"{tuple(b.shape)} disagree on the rank"
            )
        pairs[(module, depth)] = (a, b)
    return pairs, h.hexdigest()[:32]


def _scaling(cfg: dict, module: str, rank: int, path: Path) -> float:
    r = pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"])
    alpha = pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
    if cfg.get("use_rslora"):
        return alpha / math.sqrt(r)
    return alpha / r


def _checked_linear(path: Path, module: str, w: LoraWeights, base: BaseShapes) -> LoraWeights:
    shape = base.linears.get(module)
    if shape is None:
        raise LoraError(f"LoRA adapter {path}: the base model has no linear {module}")
    if (w.b.shape[0], w.a.shape[1]) != shape:
        raise LoraError(
            f"LoRA adapter {path}: {module} is {w.b.shape[0]}x{w.a.shape[1]} "
            f"(out x in), the base model's is {shape[0]}x{shape[1]}"
        )
    return w


def _stack_per_expert(
    path: Path, key: tuple[int, str], parts: dict[tuple[int, int | None], LoraWeights],
    base: BaseShapes,
) -> ExpertLoraWeights:  # fmt: skip
    """Per-expert 2-D factors -> [E, r, in] / [E, out, r]; experts without an update get zero
    factors (the same rank, so the stack is rectangular)."""
    layer, target = key
    if layer not in base.experts:
        raise LoraError(f"LoRA adapter {path}: layer {layer} of the base model has no experts")
    e, inter, hidden = base.experts[layer]
    halves = (0, 1) if target == "gate_up" else (None,)
    rank = max(w.a.shape[0] for w in parts.values())
    in_f, out_half = (hidden, inter) if target == "gate_up" else (inter, hidden)
    a = torch.zeros(e, rank * len(halves), in_f)
    b = torch.zeros(e, out_half * len(halves), rank * len(halves))
    for (expert, half), w in parts.items():
        if expert >= e:
            raise LoraError(f"LoRA adapter {path}: layer {layer} has no expert {expert}")
        if w.a.shape[0] != rank or (w.b.shape[0], w.a.shape[1]) != (out_half, in_f):
            raise LoraError(
                f"LoRA adapter {path}: layer {layer} expert {expert} {target} factors "
                f"{tuple(w.a.shape)} / {tuple(w.b.shape)} do not fit the base model"
            )
        h = 0 if half is None else half
        a[expert, h * rank : (h + 1) * rank] = w.a
        b[expert, h * out_half : (h + 1) * out_half, h * rank : (h + 1) * rank] = w.b
    return ExpertLoraWeights(a, b)


def _split_fused(
    path: Path, cfg: dict, layer: int, by_depth: dict[int, LoraWeights], base: BaseShapes
) -> dict[tuple[int, str], ExpertLoraWeights]:
    """3-D `target_parameters` factors of one experts module -> per projection."""
    if layer not in base.experts:
        raise LoraError(f"LoRA adapter {path}: layer {layer} of the base model has no experts")
    targeted = [
        p for p in _FUSED_PARAMS
        if any(str(t).split(".")[-1] == p for t in cfg.get("target_parameters") or ())
    ]  # fmt: skip
    if len(targeted) != len(by_depth):
        raise LoraError(
            f"LoRA adapter {path}: layer {layer} experts hold {len(by_depth)} LoRA parameter(s), "
            f"target_parameters names {targeted or 'none'}"
        )
    e, inter, hidden = base.experts[layer]
    shapes = {"gate_up_proj": (2 * inter, hidden), "down_proj": (hidden, inter)}
    out = {}
    for i, param in enumerate(targeted):  # first registered = innermost = deepest
        w = by_depth.get(len(targeted) - 1 - i)
        if w is None:
            raise LoraError(f"LoRA adapter {path}: layer {layer} experts nesting is incomplete")
        out_f, in_f = shapes[param]
        r_e, r_b = w.a.shape[0], w.b.shape[1]
        if r_e % e or r_e != r_b or w.a.shape[1] != in_f or w.b.shape[0] != out_f:
            raise LoraError(
                f"LoRA adapter {path}: layer {layer} experts.{param} factors "
                f"{tuple(w.a.shape)} / {tuple(w.b.shape)} do not fit {e} experts of "
                f"{out_f}x{in_f}"
            )
        r = r_e // e
        a = w.a.view(e, r, in_f).contiguous()
        b = w.b.view(out_f, r, e).permute(2, 0, 1).contiguous()
        out[(layer, param.removesuffix("_proj"))] = ExpertLoraWeights(a, b)
    return out
