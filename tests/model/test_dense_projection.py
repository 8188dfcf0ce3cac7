"""Dense projections through the panel kernel: same result as F.linear, fused q/k/v, bias,
repacked after an in-place weight update, plain F.linear where the kernel does not apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from serve_app.kernels import cpu as cpu_kernel
from serve_app.model.layers.linear import project


@pytest.mark.parametrize("rows", [1, 64, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_projection_matches_linear(rows, bias):
    torch.manual_seed(rows)
    mods = [nn.Linear(64, n, bias=bias) for n in (64, 32, 32)]
    x = torch.randn(rows, 64)
    with torch.inference_mode():
        got = project(x, *mods)
        for y, m in zip(got, mods, strict=True):
            torch.testing.assert_close(y, F.linear(x, m.weight, m.bias), atol=1e-5, rtol=1e-5)


def test_weight_update_is_seen():
    torch.manual_seed(0)
    m = nn.Linear(64, 96, bias=False)
    x = torch.randn(4, 64)
    project(x, m)
    with torch.no_grad():
        m.weight.mul_(2.0)
    torch.testing.assert_close(project(x, m)[0], x @ m.weight.t(), atol=1e-5, rtol=1e-5)


def test_falls_back_where_the_kernel_does_not_apply(monkeypatch):
    torch.manual_seed(0)
    odd = nn.Linear(64, 16)  # no panel multiple (a MoE router gate)
    x = torch.randn(3, 64)
    torch.testing.assert_close(project(x, odd)[0], odd(x))
    monkeypatch.setattr(cpu_kernel, "load", lambda: None)
    m = nn.Linear(64, 64)
    torch.testing.assert_close(project(x, m)[0], m(x))
