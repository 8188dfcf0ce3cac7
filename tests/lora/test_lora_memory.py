"""The adapter registry's memory tiers, exact state: LRU eviction order under the count and the
byte budget, pinning, the host tier (an evicted adapter made resident again with its directory
gone), and the reserve's arithmetic. Adapters are written by hand (one q_proj, rank r) on a
made-up base, so every byte count is known: r x (16 + 8) x 4 bytes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from serve_app.engine.config import ConfigError, EngineConfig
from serve_app.lora.memory import lora_budget_bytes, max_adapter_bytes
from serve_app.lora.peft_format import BaseShapes, LoraError
from serve_app.lora.registry import LoraLimits, LoraRegistry, victims

Q = "model.layers.0.self_attn.q_proj"
SHAPES = BaseShapes({Q: (8, 16)}, {})  # out 8, in 16
TARGETS = {Q: None}


def rank_bytes(r: int) -> int:
    return r * (16 + 8) * 4


def write_adapter(
    root: Path, name: str, r: int = 2, seed: int = 0, module: str = Q, shape=(8, 16)
) -> str:
    out = root / name
    out.mkdir(parents=True)
    (out / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": r}))
    g = torch.Generator().manual_seed(seed)
    save_file(
        {
            f"base_model.model.{module}.lora_A.weight": torch.randn(r, shape[1], generator=g),
            f"base_model.model.{module}.lora_B.weight": torch.randn(shape[0], r, generator=g),
        },
        str(out / "adapter_model.safetensors"),
    )
    return str(out)


def registry(**limits) -> LoraRegistry:
    return LoraRegistry(SHAPES, TARGETS, 16, experts_in_process=True, limits=LoraLimits(**limits))


@pytest.fixture
def dirs(tmp_path):
    return {n: write_adapter(tmp_path, n, seed=i) for i, n in enumerate("abcde")}


def test_count_limit_evicts_least_recently_used_to_the_host_tier(dirs):
    reg = registry(max_loras=2, max_cpu_loras=3)
    reg.load("a", dirs["a"])
    reg.load("b", dirs["b"])
    reg.resolve("a", dirs["a"])  # a is now the most recent
    reg.load("c", dirs["c"])
    assert reg.names() == ["a", "c"] and reg.host_names() == ["b"]
    reg.load("d", dirs["d"])  # evicts a; the host tier holds 3 - 2 resident = 1: b dropped
    assert reg.names() == ["c", "d"] and reg.host_names() == ["a"]
    assert (reg.num_disk_loads, reg.num_host_loads, reg.num_evictions) == (4, 0, 2)


def test_an_evicted_adapter_comes_back_from_host_memory_without_its_directory(dirs):
    reg = registry(max_loras=1, max_cpu_loras=2)
    first = reg.resolve("a", dirs["a"])
    reg.resolve("b", dirs["b"])
    shutil.rmtree(dirs["a"])  # a disk read would now fail
    again = reg.resolve("a", dirs["a"])
    assert reg.names() == ["a"] and reg.host_names() == ["b"]
    assert again.digest == first.digest and torch.equal(again.linears[Q].b, first.linears[Q].b)
    assert (reg.num_disk_loads, reg.num_host_loads) == (2, 1)
    # a newer revision is not taken from the host tier: it must be read (and here cannot be)
    reg.resolve("b", dirs["b"])
    with pytest.raises(LoraError, match="is not a directory"):
        reg.resolve("a", dirs["a"], revision=1)
    assert reg.names() == ["b"] and reg.host_names() == ["a"]  # what was held stays


def test_beyond_the_host_tier_it_is_read_from_disk_again(dirs):
    reg = registry(max_loras=1, max_cpu_loras=1)  # no room for evicted adapters
    reg.resolve("a", dirs["a"])
    reg.resolve("b", dirs["b"])
    assert reg.host_names() == []
    reg.resolve("a", dirs["a"])
    assert (reg.num_disk_loads, reg.num_host_loads) == (3, 0)


def test_byte_budget_evicts_until_the_new_adapter_fits(tmp_path):
    big = write_adapter(tmp_path, "big", r=8)
    small = {n: write_adapter(tmp_path, n, r=2, seed=i) for i, n in enumerate("abc")}
    reg = registry(max_loras=8, max_bytes=rank_bytes(2) * 3)
    for n in "abc":
        reg.load(n, small[n])
    assert reg.memory().resident_bytes == rank_bytes(2) * 3
    with pytest.raises(LoraError, match=f"{rank_bytes(8)} bytes do not fit .* {rank_bytes(6)}"):
        reg.load("big", big)  # bigger than the whole budget: nothing evicted
    assert reg.names() == ["a", "b", "c"]
    reg.unload("a")
    mid = write_adapter(tmp_path, "mid", r=4)
    reg.load("mid", mid)  # needs 4 of the 6 units: b (LRU) goes, c stays
    assert reg.names() == ["c", "mid"] and reg.host_names() == ["b"]
    mem = reg.memory()
    assert (mem.resident, mem.resident_bytes, mem.budget_bytes) == (2, rank_bytes(6), rank_bytes(6))
    assert (mem.host, mem.host_bytes) == (1, rank_bytes(2))


def test_pinned_adapters_are_never_evicted(dirs):
    reg = registry(max_loras=3)
    reg.load("a", dirs["a"], pinned=True)
    reg.load("b", dirs["b"])
    reg.load("c", dirs["c"])
    reg.load("d", dirs["d"])  # a is the least recently used but pinned: b goes
    assert reg.names() == ["a", "c", "d"] and reg.memory().pinned == ("a",)
    reg.load("e", dirs["e"], pinned=True)  # c goes
    assert reg.names() == ["a", "d", "e"]
    with pytest.raises(LoraError, match=r"^cannot pin LoRA adapter b: 2 adapters are pinned"):
        reg.load("b", dirs["b"], pinned=True)  # a third pin of 3 slots: refused
    assert reg.names() == ["a", "d", "e"]
    assert reg.unload("a")  # an explicit unload of a pinned adapter works
    assert reg.names() == ["d", "e"] and reg.memory().pinned == ("e",)


def test_an_unload_up_to_a_revision_keeps_a_newer_load(dirs):
    reg = registry(max_loras=2, max_cpu_loras=4)
    reg.load("a", dirs["a"], revision=3, pinned=True)
    assert not reg.unload("a", up_to=2)  # an older revision's unload, arriving late: a stays
    assert reg.names() == ["a"] and reg.memory().pinned == ("a",)
    assert reg.unload("a", up_to=3) and reg.names() == [] and reg.memory().pinned == ()
    for n in "bcd":
        reg.load(n, dirs[n])
    assert reg.names() == ["c", "d"] and reg.host_names() == ["b"]
    assert reg.unload("b", up_to=0) and reg.host_names() == []  # from the host tier too


def test_pinned_bytes_leave_no_room(tmp_path):
    a, b = write_adapter(tmp_path, "a", r=4), write_adapter(tmp_path, "b", r=4)
    reg = registry(max_loras=4, max_bytes=rank_bytes(6))
    reg.load("a", a, pinned=True)
    with pytest.raises(LoraError, match="do not fit next to the pinned adapters"):
        reg.load("b", b)
    assert reg.names() == ["a"]


def test_victims_is_pure_lru_skipping_pins():
    lru = [("a", 10, True), ("b", 10, False), ("c", 10, False)]
    assert victims(lru, 3, None, 10) == ["b"]
    assert victims(lru, 8, 30, 15) == ["b", "c"]
    assert victims(lru, 8, 30, 25) is None  # a alone (pinned) leaves 20
    assert victims(lru, 8, None, 10**9) == []


def test_reserve_is_max_loras_times_the_largest_adapter():
    shapes = BaseShapes({Q: (8, 16), "model.layers.0.mlp.gate": (4, 16)}, {0: (4, 6, 16)})
    linears = 16 * (8 + 16 + 4 + 16) * 4
    experts = 16 * 4 * ((16 + 12) + (6 + 16)) * 4  # gate_up [E, r, D] / [E, 2I, r]; down
    targets = [Q, "model.layers.0.mlp.gate"]
    assert max_adapter_bytes(shapes, targets, 16, experts_in_process=False) == linears
    assert max_adapter_bytes(shapes, targets, 16, experts_in_process=True) == linears + experts
    assert lora_budget_bytes(8, 1000, 0.5, True, 1e9) == 1 << 29  # explicit: as given
    assert lora_budget_bytes(8, 1000, 0.0, False, None) == 0
    assert lora_budget_bytes(8, 1000, None, True, None) == 8000  # explicit block count
    assert lora_budget_bytes(8, 1000, None, True, 10_000) == 5000  # at most half the pool
    assert lora_budget_bytes(8, 1000, None, False, 1e9) is None  # serves no adapters: none


def test_the_kv_pool_gives_up_the_adapters_reserve(qwen3_tiny, tmp_path):
    """An engine serving adapters: max_loras x the largest adapter max_lora_rank allows (every
    decoder linear and the in-process experts of the tiny Qwen3-MoE) comes out of the KV
    pool's memory. One serving none reserves nothing."""
    from serve_app.model.loader import base_shapes
    from serve_app.runtime.factory import build_engine

    shapes = base_shapes(qwen3_tiny)
    decoder = [k for k in shapes.linears if k.startswith("model.layers.")]
    reserve = 4 * max_adapter_bytes(shapes, decoder, 8, experts_in_process=True)
    q = "model.layers.0.self_attn.q_proj"
    path = write_adapter(tmp_path, "q", r=4, module=q, shape=shapes.linears[q])
    gb = 0.01
    common = dict(model=str(qwen3_tiny), kv_cache_memory_gb=gb, max_loras=4, max_lora_rank=8)
    none = build_engine(EngineConfig(**common))
    lora = build_engine(EngineConfig(**common, lora_adapters=(("q", path),)))
    try:
        budget, block = gb * (1 << 30), none.kv_block_bytes
        assert (none.num_kv_blocks, none.lora_kv_blocks) == (int(budget // block), 0)
        assert none.lora.limits.max_bytes is None
        assert lora.lora.limits.max_bytes == reserve < budget // 2
        assert lora.num_kv_blocks == int((budget - reserve) // block)
        assert lora.stats().kv_lora_blocks == none.num_kv_blocks - lora.num_kv_blocks > 0
        assert lora.lora.memory().resident_bytes == 4 * sum(shapes.linears[q]) * 4
    finally:
        none.close()
        lora.close()


def test_engine_config_refuses_pins_it_cannot_keep():
    adapters = (("a", "/a"), ("b", "/b"))
    with pytest.raises(ConfigError, match="at most max_loras - 1 = 1"):
        EngineConfig(model="m", max_loras=2, lora_adapters=adapters, lora_pinned=("a", "b"))
    with pytest.raises(ConfigError, match=r"not loaded at start: \['c'\]"):
        EngineConfig(model="m", lora_adapters=adapters, lora_pinned=("c",))
    with pytest.raises(ConfigError, match="max_cpu_loras must be >= max_loras"):
        EngineConfig(model="m", max_loras=4, max_cpu_loras=2)
