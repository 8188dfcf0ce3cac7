"""The engine with its experts in 2 Ray actors gives the in-process engine's greedy tokens,
including steps that run as two ping-pong micro-batches."""

from __future__ import annotations

import time

import pytest
from transformers import AutoTokenizer

from serve_app.deployments.remote_experts import RemoteExperts
from serve_app.engine.config import EngineConfig
from serve_app.engine.engine import LLMEngine
from serve_app.engine.outputs import EngineRequest
from serve_app.engine.request import SamplingParams
from serve_app.experts.placement import place_experts
from serve_app.model.config import load_model_spec
from serve_app.runtime.factory import build_engine
from tests.conftest import tiny_model_dir

pytestmark = pytest.mark.slow


def _queue(engine: LLMEngine, prompts: list[str], params: SamplingParams) -> None:
    """The prompts as the front end sends them: token ids, one sequence each."""
    tok = AutoTokenizer.from_pretrained(engine.config.model)
    for i, p in enumerate(prompts):
        engine.add_request(EngineRequest(str(i), tok.encode(p), params))


def _run(engine: LLMEngine, prompts: list[str]) -> dict[str, list[int]]:
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    _queue(engine, prompts, params)
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_expert_actors_match_in_process(ray_cluster, arch):
    """DeepSeek: routed experts on the shards; its gate (fp32, correction bias, grouped top-k)
    and shared experts on the router."""
    from serve_app.deployments.expert_actor import ExpertShardActor

    model = str(tiny_model_dir(arch))
    config = EngineConfig(model=model, num_kv_blocks=256, max_model_len=512)
    prompts = [f"Story {i}: once upon a time " * (1 + i % 3) for i in range(12)]
    reference = _run(build_engine(config), prompts)

    spec = load_model_spec(model)
    placement = place_experts(spec.num_experts, 2)
    actors = [
        ExpertShardActor.options(num_cpus=0).remote(model, list(s), "cpu", "float32", 1)
        for s in placement.shards
    ]
    assert [ray_cluster.get(a.info.remote())["owned"] for a in actors] == [
        list(s) for s in placement.shards
    ]
    experts = RemoteExperts(placement, lambda s: actors[s])
    remote = build_engine(config, experts)
    assert remote.runner.num_micro_batches == 2
    assert _run(remote, prompts) == reference
    assert remote.runner.num_split_steps > 0  # the ping-pong path ran
    assert remote.stats().kv_blocks_used == 0
    assert experts._links[0] is not None  # the layer calls took the expert channel
    for a in actors:
        ray_cluster.kill(a)


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_rebalance_mid_generation_keeps_outputs_and_drops_nothing(ray_cluster, arch):
    """Add replicas on the shards, switch the dispatcher between steps, then drop: the same
    greedy tokens as in-process, with requests running across both switches. DeepSeek: the
    hot expert's copies serve tokens that its gate picked through grouped top-k."""
    from serve_app.deployments.expert_actor import ExpertShardActor
    from serve_app.experts.rebalance import RebalanceConfig, plan_rebalance

    model = str(tiny_model_dir(arch))
    config = EngineConfig(model=model, num_kv_blocks=256, max_model_len=512)
    prompts = [f"Tale {i}: the river bends " * (1 + i % 2) for i in range(6)]
    reference = _run(build_engine(config), prompts)

    spec = load_model_spec(model)
    placement = place_experts(spec.num_experts, 2)
    actors = [
        ExpertShardActor.options(num_cpus=0).remote(model, list(s), "cpu", "float32", 1)
        for s in placement.shards
    ]
    experts = RemoteExperts(placement, lambda s: actors[s])
    engine = build_engine(config, experts)
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    _queue(engine, prompts, params)
    tokens: dict[str, list[int]] = {}

    def steps(n: int) -> None:
        for _ in range(n):
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)

    steps(5)
    load = experts.load.snapshot()
    assert sum(load.shard_tokens) > 0 and sum(load.expert_tokens) > 0
    # Pretend expert 0 is hot, so the plan replicates it (the counts are real otherwise).
    hot = list(load.expert_tokens)
    hot[0] += 10 * sum(hot)
    plan = plan_rebalance(placement, hot, RebalanceConfig(imbalance_threshold=1.1, min_tokens=0))
    assert plan is not None and len(plan.placement.replicas()[0]) == 2

    # 1. shards load the new experts (they still serve the old placement meanwhile)
    adds = zip(actors, plan.add, strict=True)
    ray_cluster.get([a.add_experts.remote(list(e)) for a, e in adds])
    steps(3)
    # 2. the router switches between two steps
    experts.set_placement(plan.placement)
    steps(3)
    # 3. shards free what no router sends them any more
    drops = zip(actors, plan.drop, strict=True)
    owned = ray_cluster.get([a.drop_experts.remote(list(e)) for a, e in drops])
    assert owned == [list(s) for s in plan.placement.shards]
    steps(100)
    assert not engine.has_unfinished_requests()
    assert tokens == reference
    for a in actors:
        ray_cluster.kill(a)


def test_unavailable_shards_names_dead_and_unresolvable_shards(ray_cluster, qwen3_tiny):
    import asyncio

    from serve_app.deployments.expert_actor import ExpertShardActor

    model = str(qwen3_tiny)
    placement = place_experts(load_model_spec(model).num_experts, 2)
    actors = [
        ExpertShardActor.options(num_cpus=0).remote(model, list(s), "cpu", "float32", 1)
        for s in placement.shards
    ]
    ray_cluster.get([a.ping.remote() for a in actors], timeout=300)  # started (slow on 2 cores)
    gone = {1}  # shard 1 is "being recreated": not registered under its name

    def resolve(shard: int):
        if shard in gone:
            raise ValueError("not registered")
        return actors[shard]

    remote = RemoteExperts(placement, resolve)
    assert asyncio.run(remote.unavailable_shards(timeout_s=10)) == [1]
    # /health's weights.shard_bytes: each live shard's bytes as held, None for a silent one
    infos = asyncio.run(remote.shard_infos(timeout_s=10))
    assert infos[1] is None and infos[0]["owned"] == list(placement.shards[0])
    assert infos[0]["weight_bytes"] > 0
    ray_cluster.kill(actors[0], no_restart=True)
    gone.clear()
    # ray.kill returns before the actor is gone: a ping may still be answered just after it.
    deadline = time.monotonic() + 60
    while (down := asyncio.run(remote.unavailable_shards(timeout_s=10))) != [0]:
        assert time.monotonic() < deadline, down
        time.sleep(0.5)
    ray_cluster.kill(actors[1])


def test_a_shard_killed_mid_generation_is_replaced_over_the_channel(ray_cluster, qwen3_tiny):
    """The link to a dead shard fails; the router re-resolves it by name, connects to the new
    actor and resends: the same greedy tokens, and the retry is counted."""
    import ray

    from serve_app.deployments.expert_actor import ExpertShardActor

    model = str(qwen3_tiny)
    config = EngineConfig(model=model, num_kv_blocks=256, max_model_len=512)
    prompts = [f"Fable {i}: a fox and a crow " * (1 + i % 2) for i in range(4)]
    reference = _run(build_engine(config), prompts)

    placement = place_experts(load_model_spec(model).num_experts, 2)

    def start(shard: int):
        owned = list(placement.shards[shard])
        return ExpertShardActor.options(num_cpus=0).remote(model, owned, "cpu", "float32", 1)

    actors = [start(s) for s in range(2)]
    experts = RemoteExperts(placement, lambda s: actors[s], retry_interval_s=0.05)
    engine = build_engine(config, experts)
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    _queue(engine, prompts, params)
    tokens: dict[str, list[int]] = {}

    def step() -> None:
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)

    for _ in range(4):
        step()
    assert experts._links[0] is not None
    old = actors[0]
    ray_cluster.kill(old, no_restart=True)
    deadline = time.monotonic() + 60
    while True:  # ray.kill returns before the process is gone
        try:
            ray.get(old.ping.remote(), timeout=5)
        except ray.exceptions.RayError:
            break
        assert time.monotonic() < deadline
        time.sleep(0.1)
    actors[0] = start(0)  # what the Serve controller does
    while engine.has_unfinished_requests():
        step()
    assert tokens == reference
    assert experts.num_retries >= 1
    for a in actors:
        ray_cluster.kill(a)


def test_a_shard_asked_for_experts_it_lacks_is_a_503_not_a_wrong_answer(ray_cluster, qwen3_tiny):
    """A router whose placement is newer than a shard's weights: the shard refuses the call,
    the step fails with ExpertsUnavailableError, and the next call works on fresh links."""
    import torch

    from serve_app.deployments.expert_actor import ExpertShardActor
    from serve_app.engine.errors import ExpertsUnavailableError
    from serve_app.experts.placement import Placement

    model = str(qwen3_tiny)
    spec = load_model_spec(model)
    n = spec.num_experts
    half = tuple(range(n // 2))
    actor = ExpertShardActor.options(num_cpus=0).remote(model, list(half), "cpu", "float32", 1)
    # the router believes the one shard holds every expert; it holds only the first half
    experts = RemoteExperts(Placement(n, (tuple(range(n)),)), lambda s: actor)
    x = torch.randn(3, spec.hidden_size)
    w = torch.full((3, 2), 0.5)
    with pytest.raises(ExpertsUnavailableError, match="does not hold experts"):
        experts.forward(0, x, torch.tensor([[0, n - 1]] * 3), w)
    assert experts._links == [None]  # nothing unread is left on a link
    y = experts.forward(0, x, torch.tensor([[0, 1]] * 3), w)
    assert y.shape == x.shape and torch.isfinite(y).all()
    ray_cluster.kill(actor)
