"""Splitting tokens by expert shard: every placement gives the in-process experts' answer.

Pure torch: ExpertShard is used directly (no Ray), through the same bytes wire form.
"""

from __future__ import annotations

import pytest
import torch

from serve_app.engine.model_runner import MIN_MICRO_BATCH, split_micro_batches
from serve_app.engine.scheduler import SchedulerOutput
from serve_app.experts.dispatch import Dispatcher
from serve_app.experts.local import LocalExperts
from serve_app.experts.placement import place_experts
from serve_app.experts.shard import ExpertShard, as_tensor, to_numpy
from serve_app.experts.weights import load_expert_weights
from serve_app.experts.wire import decode_response, encode_request
from serve_app.model.config import RoutingSpec, load_model_spec
from serve_app.model.layers.routing import make_routing_rule

CPU = torch.device("cpu")


def _routed(spec, t: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, spec.hidden_size, generator=g)
    logits = torch.randn(t, spec.num_experts, generator=g)
    ids, w = make_routing_rule(RoutingSpec("softmax", spec.top_k, True)).route(logits)
    return x, ids, w


@pytest.mark.parametrize(
    "num_shards, load",
    [(1, None), (2, None), (3, None), (2, "hot")],
)
def test_sharded_experts_equal_in_process_experts(qwen3_tiny, num_shards, load):
    spec = load_model_spec(qwen3_tiny)
    local = LocalExperts(load_expert_weights(qwen3_tiny, CPU, torch.float32))
    if load == "hot":  # expert 0 takes most tokens: a spare slot replicates it on both shards
        loads = [100.0] + [1.0] * (spec.num_experts - 1)
        slots = spec.num_experts // num_shards + 1
        placement = place_experts(spec.num_experts, num_shards, loads, slots)
        assert placement.replicas()[0] == (0, 1)
    else:
        placement = place_experts(spec.num_experts, num_shards)
    shards = [ExpertShard(str(qwen3_tiny), list(s), CPU, torch.float32) for s in placement.shards]
    dispatcher = Dispatcher(placement)
    layer = next(i for i, m in enumerate(spec.moe_layers) if m)
    for t in (1, 5, 64, 512):
        x, ids, w = _routed(spec, t, seed=t)
        parts = []
        for sl in dispatcher.split(x, ids, w):
            # a shard gets only rows that need it, and only its own slots unmasked
            owned = set(placement.shards[sl.shard])
            assert all(e in owned for e in sl.topk_ids[sl.topk_ids >= 0].tolist())
            body = encode_request(to_numpy(sl.x), to_numpy(sl.topk_ids), to_numpy(sl.topk_weights))
            y = decode_response(shards[sl.shard].forward_bytes(layer, body))
            parts.append((sl, as_tensor(y)))
        got = Dispatcher.combine(x, parts)
        torch.testing.assert_close(got, local.forward(layer, x, ids, w), rtol=1e-5, atol=1e-6)


def test_shard_loads_only_its_experts(qwen3_tiny):
    spec = load_model_spec(qwen3_tiny)
    full = ExpertShard(str(qwen3_tiny), list(range(spec.num_experts)), CPU, torch.float32)
    half = ExpertShard(str(qwen3_tiny), [0, 1], CPU, torch.float32)
    assert half.num_bytes() * spec.num_experts == full.num_bytes() * 2


class _Req:
    def __init__(self, computed: int):
        self.num_computed_tokens = computed


def _sched(running_decodes: int, prefills: list[int], admitted_decodes: int) -> SchedulerOutput:
    reqs = [_Req(10 + i) for i in range(running_decodes)]
    new = [1] * running_decodes
    reqs += [_Req(n) for n in prefills]
    new += prefills
    out = SchedulerOutput(reqs, new)
    out.num_running_scheduled = len(reqs)
    out.requests += [_Req(33) for _ in range(admitted_decodes)]
    out.num_new_tokens += [1] * admitted_decodes
    return out


def test_micro_batches_keep_prefills_and_admissions_together():
    sched = _sched(running_decodes=12, prefills=[5], admitted_decodes=2)
    first, second = split_micro_batches(sched, 2)
    assert sorted(first + second) == list(range(15))
    assert {12, 13, 14} <= set(first)  # the prefill and both admissions
    assert all(sched.num_new_tokens[i] == 1 and i < 12 for i in second)
    tokens = [sum(sched.num_new_tokens[i] for i in mb) for mb in (first, second)]
    assert abs(tokens[0] - tokens[1]) <= 1


def test_micro_batches_only_when_worth_it():
    assert split_micro_batches(_sched(16, [], 0), 1) == [list(range(16))]
    small = 2 * MIN_MICRO_BATCH - 1
    assert split_micro_batches(_sched(small, [], 0), 2) == [list(range(small))]
    # a big prefill takes micro-batch 0 alone; decodes go to micro-batch 1
    first, second = split_micro_batches(_sched(8, [300], 0), 2)
    assert first == [8] and sorted(second) == list(range(8))


def test_shard_adds_and_drops_experts_and_refuses_ones_it_lacks(qwen3_tiny):
    spec = load_model_spec(qwen3_tiny)
    layer = next(i for i, m in enumerate(spec.moe_layers) if m)
    local = LocalExperts(load_expert_weights(qwen3_tiny, CPU, torch.float32))
    shard = ExpertShard(str(qwen3_tiny), [4, 5], CPU, torch.float32)
    x, ids, w = _routed(spec, 16, seed=3)
    with pytest.raises(ValueError, match="does not hold"):
        shard.forward(layer, to_numpy(x), to_numpy(ids), to_numpy(w))

    assert shard.add_experts(list(range(spec.num_experts))) == list(range(spec.num_experts))
    y = shard.forward(layer, to_numpy(x), to_numpy(ids), to_numpy(w))
    torch.testing.assert_close(as_tensor(y), local.forward(layer, x, ids, w))

    assert shard.drop_experts([0, 1, 2, 3]) == [4, 5, 6, 7]
    mask = ids >= 4
    mine = (torch.where(mask, ids, -1), torch.where(mask, w, 0))
    y = shard.forward(layer, to_numpy(x), to_numpy(mine[0]), to_numpy(mine[1]))
    torch.testing.assert_close(as_tensor(y), local.forward(layer, x, *mine))
    with pytest.raises(ValueError, match="at least one"):
        shard.drop_experts([4, 5, 6, 7])


def test_load_counter_counts_tokens_per_expert_and_per_shard(qwen3_tiny):
    from serve_app.experts.load import ExpertLoad, ExpertLoadCounter

    spec = load_model_spec(qwen3_tiny)
    placement = place_experts(spec.num_experts, 2)
    dispatcher = Dispatcher(placement)
    counter = ExpertLoadCounter(spec.num_experts, 2)
    x, ids, w = _routed(spec, 10, seed=1)
    slices = dispatcher.split(x, ids, w)
    counter.record(ids, slices)
    counter.record(ids, slices)  # a second layer with the same routing
    load = counter.snapshot()
    expected = torch.bincount(ids.reshape(-1), minlength=spec.num_experts) * 2
    assert load == ExpertLoad(
        tuple(expected.tolist()), tuple(2 * sl.token_idx.numel() for sl in slices)
    )
    assert sum(load.expert_tokens) == 2 * ids.numel()
