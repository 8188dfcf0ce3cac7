"""The GPU path's choices, checked on the CPU: host <-> device copies (plain tensors on the CPU,
pinned memory on CUDA, checked only where a GPU is present) and the KV budget from free memory."""

from __future__ import annotations

import pytest
import torch

from serve_app.platform.transfer import pins_memory, tensor_to_device, to_device, to_host

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_only_cuda_devices_pin_memory():
    assert not pins_memory(CPU)
    assert pins_memory(torch.device("cuda")) == torch.cuda.is_available()


def test_cpu_path_copies_nothing_and_pins_nothing():
    t = torch.arange(6, dtype=torch.float32).view(2, 3)
    assert to_device(t, CPU) is t
    as_bf16 = to_device(t, CPU, torch.bfloat16)
    assert as_bf16.dtype == torch.bfloat16 and torch.equal(as_bf16.float(), t)
    assert to_host(t).data_ptr() == t.data_ptr()
    ids = tensor_to_device([[1, 2], [3, 4]], CPU)
    assert ids.dtype == torch.long and ids.tolist() == [[1, 2], [3, 4]]
    assert not ids.is_pinned() and not to_host(ids).is_pinned()
    assert tensor_to_device([], CPU).shape == (0,)


@pytest.mark.gpu
@needs_cuda
def test_cuda_path_round_trips_through_pinned_memory():
    cuda = torch.device("cuda")
    host = torch.randn(64, 32)
    dev = to_device(host, cuda, torch.bfloat16)
    assert dev.device.type == "cuda" and dev.dtype == torch.bfloat16
    back = to_host(dev)
    assert back.is_pinned() and torch.equal(back, dev.cpu())
    ids = tensor_to_device(list(range(10)), cuda)
    assert ids.device.type == "cuda" and ids.tolist() == list(range(10))


def test_gpu_kv_budget_is_free_memory_less_the_unused_share():
    from serve_app.engine.kv_budget import gpu_kv_budget

    gib = 1 << 30
    # 80 GiB device, 20 GiB of weights loaded: at 0.9 the process may hold 72 GiB in all
    assert gpu_kv_budget(60 * gib, 80 * gib, 0.9) == 52 * gib
    assert gpu_kv_budget(60 * gib, 80 * gib, 1.0) == 60 * gib
    assert gpu_kv_budget(5 * gib, 80 * gib, 0.9) < 0  # no room: num_kv_blocks refuses it
