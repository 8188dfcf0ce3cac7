"""Host <-> device copies at the engine's edges (model inputs, expert slices, KV blocks).

On CUDA, host data goes through pinned (page-locked) memory and is copied with
non_blocking=True: the DMA runs while the host keeps building the step, as vLLM does for its
inputs. On the CPU every function is a plain copy-free `to`: nothing is pinned, nothing waits.

NOTE: a non-blocking device -> host copy is only complete after a synchronize; to_host()
synchronizes before it returns, so its result is always safe to read (numpy, Redis, Ray).
Host -> device copies need no wait: kernels on the same stream run after the copy, and
PyTorch's pinned-memory allocator keeps the source buffer until the copy has finished.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pins_memory(device: torch.device) -> bool:
    """Whether copies to/from `device` go through pinned host memory (CUDA only)."""
    return device.type == "cuda" and torch.cuda.is_available()


def to_device(
    t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """A tensor on `device` (and `dtype`); host tensors are pinned, then copied async on CUDA."""
    if not pins_memory(device) or t.device.type != "cpu":
        return t.to(device=device, dtype=dtype)
    if not t.is_pinned():
        t = t.pin_memory()
    return t.to(device=device, dtype=dtype, non_blocking=True)


def tensor_to_device(
    data: Sequence, device: torch.device, dtype: torch.dtype = torch.long
) -> torch.Tensor:
    """torch.tensor(data) built on the host, then placed on `device` (pinned on CUDA)."""
    if not pins_memory(device):
        return torch.tensor(data, dtype=dtype, device=device)
    host = torch.tensor(data, dtype=dtype, pin_memory=True)
    return host.to(device, non_blocking=True)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor with `t`'s values, ready to read; from CUDA via a pinned buffer."""
    if t.device.type != "cuda":
        return t.detach().cpu()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t.detach(), non_blocking=True)
    torch.cuda.current_stream(t.device).synchronize()
    return out
