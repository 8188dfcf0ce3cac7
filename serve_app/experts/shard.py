"""One expert shard: the experts it owns, of every MoE layer, and nothing else of the model.

Plain torch, no Ray: serve_app.deployments.expert_actor wraps it as an actor; tests use it directly.
Between processes the payloads take the wire form of serve_app.experts.wire; the shard
converts at its edge so the compute stays torch. Rows that run a LoRA adapter come with its
tag; the shard holds its experts' slices of each adapter (serve_app.experts.shard_lora) and
applies them in the same run_experts as in-process experts.
Shapes: Ts tokens sent to this shard, K experts per token, D hidden.
"""

from __future__ import annotations

import numpy as np
import torch

from serve_app.experts.local import ExpertWeights, run_experts
from serve_app.experts.shard_lora import ShardAdapters
from serve_app.experts.weights import load_expert_weights
from serve_app.experts.wire import LoraRows, decode_call, encode_response
from serve_app.lora.batch import ExpertLora, LoraBatch
from serve_app.model.loader import base_shapes
from serve_app.model.quant.scheme import NO_QUANT, Quantization
from serve_app.platform.transfer import to_device, to_host


class ExpertShard:
    def __init__(
        self,
        model_dir: str,
        owned: list[int],
        device: torch.device,
        dtype: torch.dtype,
        quant: Quantization = NO_QUANT,
        max_loras: int = 8,
    ):
        self.model_dir = model_dir
        self.owned = sorted(owned)
        self.device = device
        self.dtype = dtype
        self.quant = quant  # the experts are quantized at load, as the routers' config says
        self.layers = self._load(self.owned)
        self.adapters = ShardAdapters(lambda: base_shapes(model_dir), device, max_loras)

    def _load(self, experts: list[int]) -> dict[int, ExpertWeights]:
        return load_expert_weights(
            self.model_dir, self.device, self.dtype, experts, quant=self.quant
        )

    # NOTE: add_experts / drop_experts run on the actor's thread while forward may run on the
    # expert channel's compute thread: each replaces `layers` in one assignment, which forward
    # reads once per call, so a call sees the old or the new weights, never a mix.

    def add_experts(self, experts: list[int]) -> list[int]:
        """Load more experts (every MoE layer) from the checkpoint; returns what it now owns.

        For rebalancing: a shard gains replicas of hot experts *before* any router sends it
        their tokens (serve_app/experts/rebalance.py).
        """
        new = sorted(set(experts) - set(self.owned))
        if new:
            extra = self._load(new)
            self.layers = {layer: w.concat(extra[layer]) for layer, w in self.layers.items()}
            self.owned = sorted(self.owned + new)
        return self.owned

    def drop_experts(self, experts: list[int]) -> list[int]:
        """Free experts no router sends here any more (after every router switched)."""
        gone = set(experts) & set(self.owned)
        if gone and len(gone) == len(self.owned):
            raise ValueError("a shard must keep at least one expert")
        if gone:
            self.layers = {layer: _without(w, gone) for layer, w in self.layers.items()}
            self.owned = [e for e in self.owned if e not in gone]
        return self.owned

    @torch.inference_mode()
    def forward(
        self,
        layer: int,
        x: np.ndarray,
        topk_ids: np.ndarray,
        topk_weights: np.ndarray,
        lora: LoraRows | None = None,
    ) -> np.ndarray:
        """x [Ts, D], ids [Ts, K] (-1 = not this shard's slot), weights [Ts, K], each row's
        adapter (None: all base) -> [Ts, D]."""
        weights = self.layers[layer]
        asked = topk_ids[topk_ids >= 0]
        # NOTE: an expert this shard does not hold would silently contribute 0 (a wrong
        # answer, not an error): a router with a placement newer than this shard's weights.
        if not np.isin(asked, weights.expert_ids).all():
            missing = sorted(set(asked.tolist()) - set(weights.expert_ids))
            raise ValueError(f"expert shard does not hold experts {missing}")
        xt = to_device(as_tensor(x), self.device, self.dtype)
        ids = to_device(as_tensor(topk_ids), self.device)
        w = to_device(as_tensor(topk_weights), self.device)
        y = run_experts(weights, xt, ids, w, self._expert_lora(layer, weights, lora))
        return to_numpy(y)

    def _expert_lora(
        self, layer: int, weights: ExpertWeights, lora: LoraRows | None
    ) -> ExpertLora | None:
        """The rows' adapters as run_experts takes them, sliced to the experts of `weights`."""
        if lora is None:
            return None
        held = [self.adapters.resolve(tag, weights.expert_ids) for tag in lora.tags]
        per_row = [None if s < 0 else held[s] for s in lora.slots.tolist()]
        batch = LoraBatch.build(per_row, self.device)
        return None if batch is None else batch.experts(layer)

    def forward_bytes(self, layer: int, body: bytes | memoryview) -> bytes:
        """forward() on the expert channel's frames (serve_app.experts.channel): an
        encode_request body in, an encode_response body out."""
        return encode_response(self.forward(layer, *decode_call(body)))

    def num_bytes(self) -> int:
        """The experts' weights (the adapter slices held: `adapters.nbytes`)."""
        return sum(w.nbytes for w in self.layers.values())


def _without(w: ExpertWeights, gone: set[int]) -> ExpertWeights:
    return w.select([i for i, e in enumerate(w.expert_ids) if e not in gone])


def as_tensor(a: np.ndarray) -> torch.Tensor:
    """Arrays that come out of Ray's object store are read-only views; torch wants to own."""
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """The wire form: float32 (numpy has no bfloat16) or the integer dtype, on the CPU.

    From CUDA the copy goes through pinned memory (serve_app.platform.transfer); bf16 is
    widened on the host, so the device-to-host copy moves half the bytes."""
    t = to_host(t)
    return (t if not t.is_floating_point() else t.float()).numpy()
