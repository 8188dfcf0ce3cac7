"""The boundary between the model and wherever its experts run.

The MoE layer computes the gate and top-k routing itself and hands the routed tokens to an
ExpertExecutor. In-process execution (LocalExperts) and remote expert shards implement the same
call, so the model code never knows where experts live.
Shapes: T tokens, D hidden, K experts per token.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class ExpertExecutor(ABC):
    """Runs the routed experts of every MoE layer.

    Contract: forward(layer, x [T, D], topk_ids [T, K] int64, topk_weights [T, K]) returns
    [T, D] = sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t]), in x's dtype and device.
    `layer` is the decoder layer index of the MoE block.
    """

    @abstractmethod
    def forward(
        self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor: ...
