"""Dense SwiGLU MLP (Llama, dense layers of MoE models, Qwen2-MoE's and DeepSeek's shared
experts): gate and up read the same input, so they run as one packed projection where the CPU
panel kernel applies (serve_app/model/layers/linear.py)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from serve_app.model.layers.linear import project


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.act_fn = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        gate, up = project(x.reshape(-1, shape[-1]), self.gate_proj, self.up_proj)
        out = project(self.act_fn(gate) * up, self.down_proj)[0]
        return out.view(*shape[:-1], -1)
