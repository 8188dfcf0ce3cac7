"""One expert shard: the experts it owns, of every MoE layer, and nothing else of the model.

Plain torch, no Ray: serve_app.experts.actor wraps it as an actor; tests use it directly.
The transport form is numpy (zero-copy through Ray's object store); the shard converts at
its edge so the compute stays torch.
Shapes: Ts tokens sent to this shard, K experts per token, D hidden.
"""

from __future__ import annotations

import numpy as np
import torch

from serve_app.engine.transfer import to_device, to_host
from serve_app.experts.local import run_experts
from serve_app.model.loader import load_expert_shard


class ExpertShard:
    def __init__(self, model_dir: str, owned: list[int], device: torch.device, dtype: torch.dtype):
        self.owned = sorted(owned)
        self.device = device
        self.dtype = dtype
        self.layers = load_expert_shard(model_dir, self.owned, device, dtype)

    @torch.inference_mode()
    def forward(
        self, layer: int, x: np.ndarray, topk_ids: np.ndarray, topk_weights: np.ndarray
    ) -> np.ndarray:
        """x [Ts, D], ids [Ts, K] (-1 = not this shard's slot), weights [Ts, K] -> [Ts, D]."""
        xt = to_device(as_tensor(x), self.device, self.dtype)
        ids = to_device(as_tensor(topk_ids), self.device)
        w = to_device(as_tensor(topk_weights), self.device)
        y = run_experts(self.layers[layer], xt, ids, w)
        return to_numpy(y)

    def num_bytes(self) -> int:
        return sum(w.w13.nbytes + w.w2.nbytes for w in self.layers.values())


def as_tensor(a: np.ndarray) -> torch.Tensor:
    """Arrays that come out of Ray's object store are read-only views; torch wants to own."""
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """The wire form: float32 (numpy has no bfloat16) or the integer dtype, on the CPU.

    From CUDA the copy goes through pinned memory (serve_app.engine.transfer); bf16 is
    widened on the host, so the device-to-host copy moves half the bytes."""
    t = to_host(t)
    return (t if not t.is_floating_point() else t.float()).numpy()
