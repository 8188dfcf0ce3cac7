"""Expert LoRA on expert shards: for every MoE architecture, the engine over 2 ExpertShards
behind real expert channels (in this process, no Ray) gives transformers + PEFT's merged
model's greedy tokens for each adapter kind of peft_cases.py (q/v only, every linear incl. the
routed experts as 3-D factors and per expert, 3-D expert `target_parameters`); a batch mixing
the base model and every adapter gives each request its tokens alone; each shard holds only
its own experts' slices of the adapters with expert LoRA; and a shard refuses an adapter that
is not the router's."""

from __future__ import annotations

import pytest
import torch

from serve_app.deployments.remote_experts import RemoteExperts
from serve_app.engine.config import EngineConfig
from serve_app.experts.channel import ShardServer
from serve_app.experts.placement import place_experts
from serve_app.experts.shard import ExpertShard
from serve_app.experts.shard_lora import ShardAdapters
from serve_app.experts.wire import AdapterTag
from serve_app.lora.peft_format import ExpertLoraWeights, load_adapter
from serve_app.model.config import load_model_spec
from serve_app.model.loader import base_shapes
from serve_app.runtime.factory import build_engine
from serve_app.runtime.llm import LLM
from tests.conftest import tiny_model_dir
from tests.lora.peft_cases import CASES, check_adapters_alone_and_mixed, engine_kwargs

peft = pytest.importorskip("peft")

MOE_ARCHS = sorted(a for a, kinds in CASES.items() if "experts3d" in kinds)


def sharded_llm(arch: str, adapters: dict, num_shards: int = 2):
    """An LLM whose routed experts run on `num_shards` ExpertShards over the expert channel."""
    model = str(tiny_model_dir(arch))
    placement = place_experts(load_model_spec(model).num_experts, num_shards)
    shards = [ExpertShard(model, list(s), torch.device("cpu"), torch.float32)
              for s in placement.shards]  # fmt: skip
    servers = [ShardServer(s.forward_bytes, "127.0.0.1") for s in shards]
    experts = RemoteExperts(
        placement, lambda s: servers[s], call_timeout_s=30, address_of=lambda h, _t: h.address
    )
    engine = build_engine(EngineConfig(model=model, **engine_kwargs(adapters)), experts)
    assert engine.runner.num_micro_batches == 2  # the ping-pong path carries the slots too
    return LLM.over(engine), shards, servers


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_expert_lora_on_shards_matches_peft_merged(arch, parity_adapters):
    model_dir = tiny_model_dir(arch)
    adapters = parity_adapters(arch)
    llm, shards, servers = sharded_llm(arch, adapters)
    try:
        check_adapters_alone_and_mixed(llm, model_dir, adapters)
        # the router keeps no expert factors; each shard holds the adapters with expert LoRA,
        # only its own experts' rows, no linears
        full = {k: load_adapter(k, d, base_shapes(model_dir), 64) for k, d in adapters.items()}
        with_experts = sorted(k for k, a in full.items() if a.experts)
        assert with_experts == ["all", "experts3d", "per_expert"]
        on_router = llm.engine.lora.get("all")
        assert not on_router.experts and on_router.experts_elsewhere and on_router.linears
        for shard in shards:
            assert sorted(shard.adapters.names()) == with_experts
            ids = next(iter(shard.layers.values())).expert_ids
            for kind in with_experts:
                tag = AdapterTag(kind, str(adapters[kind]), full[kind].digest)
                held = shard.adapters.resolve(tag, ids)
                assert not held.linears
                for key, w in held.experts.items():
                    kept = (w.index >= 0).nonzero().squeeze(1).tolist()
                    assert kept == shard.owned
                    a = full[kind].experts[key].a[kept]
                    torch.testing.assert_close(w.a, a, rtol=0, atol=0)
        assert shards[0].adapters.num_loads == len(with_experts)  # once each: the rest hit
    finally:
        for s in servers:
            s.close()


def test_select_packs_only_the_experts_an_adapter_changes():
    a = torch.zeros(4, 2, 3)
    b = torch.zeros(4, 5, 2)
    a[1], b[1], a[3], b[3] = 1.0, 2.0, 3.0, 4.0
    part = ExpertLoraWeights(a, b).select([0, 1, 2])
    assert part.index.tolist() == [-1, 0, -1, -1] and part.a.shape == (1, 2, 3)
    assert ExpertLoraWeights(a, b).select([0, 2]) is None


def test_a_shard_refuses_an_adapter_that_is_not_the_routers(parity_adapters):
    model_dir = tiny_model_dir("qwen3_moe")
    adapters = parity_adapters("qwen3_moe")
    held = ShardAdapters(lambda: base_shapes(model_dir), torch.device("cpu"))
    path = str(adapters["experts3d"])
    with pytest.raises(ValueError, match="changed since the router loaded it"):
        held.resolve(AdapterTag("x", path, "0" * 32), [0, 1])
    with pytest.raises(ValueError, match="expert shard cannot load LoRA adapter 'y'"):
        held.resolve(AdapterTag("y", path + "-gone", "0" * 32), [0, 1])
    assert held.names() == [] and held.nbytes == 0


def test_a_shard_drops_an_unloaded_adapter_and_loads_it_again_when_named(parity_adapters):
    model_dir = tiny_model_dir("qwen3_moe")
    adapters = parity_adapters("qwen3_moe")
    held = ShardAdapters(lambda: base_shapes(model_dir), torch.device("cpu"))
    path = str(adapters["experts3d"])
    tag = AdapterTag("x", path, load_adapter("x", path, base_shapes(model_dir), 64).digest)
    held.resolve(tag, [0, 1])
    assert held.names() == ["x"] and held.nbytes > 0
    assert held.drop("x") and not held.drop("x")
    assert held.names() == [] and held.nbytes == 0
    held.resolve(tag, [0, 1])  # a request routed before the unload still runs
    assert held.names() == ["x"] and held.num_loads == 2
