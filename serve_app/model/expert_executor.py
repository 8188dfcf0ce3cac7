"""The boundary between the model and wherever its experts run.

The MoE layer computes the gate and top-k routing itself and hands the routed tokens to an
ExpertExecutor. In-process execution (LocalExperts) and remote expert shards implement the same
call, so the model code never knows where experts live.
Shapes: T tokens, D hidden, K experts per token.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class ExpertFuture(ABC):
    """The pending result of ExpertExecutor.submit(); result() blocks until it is there."""

    @abstractmethod
    def result(self) -> torch.Tensor: ...


class DoneFuture(ExpertFuture):
    __slots__ = ("value",)

    def __init__(self, value: torch.Tensor):
        self.value = value

    def result(self) -> torch.Tensor:
        return self.value


class ExpertExecutor(ABC):
    """Runs the routed experts of every MoE layer.

    Contract: forward(layer, x [T, D], topk_ids [T, K] int64, topk_weights [T, K]) returns
    [T, D] = sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t]), in x's dtype and device.
    `layer` is the decoder layer index of the MoE block.

    submit() starts the same computation and returns at once; executors whose experts live
    elsewhere override it so the caller can compute something else meanwhile (the ping-pong of
    micro-batches). The in-process default simply computes.
    """

    @abstractmethod
    def forward(
        self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor: ...

    def submit(
        self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> ExpertFuture:
        return DoneFuture(self.forward(layer, x, topk_ids, topk_weights))

    def weight_bytes(self) -> int:
        """Bytes of the expert weights held in this process (0 where they live elsewhere)."""
        return 0

    @property
    def is_remote(self) -> bool:
        """True when submit() returns before the experts have run (overlap pays off)."""
        return False
