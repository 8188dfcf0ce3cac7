"""build_app wires the config into Serve deployments before anything runs (no cluster)."""

from __future__ import annotations

from dataclasses import fields

import pytest
from pydantic import ValidationError

from autoscaling.policy import PolicyConfig, ServePolicy
from serve_app.builder import build_app
from serve_app.config import AppConfig, AutoscalingSettings
from serve_app.deployments.version_app import ROUTER_POLICY
from tests.conftest import tiny_model_dir


def _router(app):
    return app._bound_deployment.init_args[0]._bound_deployment


def test_expert_shards_are_deployment_scoped_actors_of_the_router(qwen3_tiny):
    app = build_app({"model": str(qwen3_tiny), "expert_parallel_size": 2})
    actors = _router(app)._deployment_config.deployment_actors
    assert [a.name for a in actors] == ["experts-0", "experts-1"]
    owned = [a.init_args[1] for a in actors]
    assert sorted(e for o in owned for e in o) == list(range(8))  # every expert, once
    in_process = _router(build_app({"model": str(qwen3_tiny)}))
    assert not in_process._deployment_config.deployment_actors


def test_expert_shards_quantize_as_the_engine_config_says(qwen3_tiny):
    engine = {"quantization": "int4", "quantization_group_size": 32}
    app = build_app({"model": str(qwen3_tiny), "expert_parallel_size": 2, "engine": engine})
    actors = _router(app)._deployment_config.deployment_actors
    assert all(a.init_args[5:7] == ("int4", 32) for a in actors)  # quantization, group size
    with pytest.raises(ValidationError, match="quantization"):
        AppConfig.model_validate({"model": str(qwen3_tiny), "engine": {"quantization": "int3"}})
    with pytest.raises(ValidationError, match="quantization_group_size must be one of"):
        AppConfig.model_validate(
            {"model": str(qwen3_tiny), "engine": {"quantization_group_size": 48}}
        )


def test_the_expert_balancer_is_one_more_deployment_actor_when_enabled(qwen3_tiny):
    rebalance = {"enabled": True, "window_s": 30, "min_tokens": 50}
    experts = {"rebalance": rebalance}
    app = build_app({"model": str(qwen3_tiny), "expert_parallel_size": 2, "experts": experts})
    actors = _router(app)._deployment_config.deployment_actors
    assert [a.name for a in actors] == ["experts-0", "experts-1", "expert-balancer"]
    num_experts, shards, config, _ = actors[2].init_args
    assert (num_experts, shards) == (8, [[0, 1, 2, 3], [4, 5, 6, 7]])
    assert (config.window_s, config.rebalance.min_tokens) == (30, 50)
    off = build_app({"model": str(qwen3_tiny), "expert_parallel_size": 2})
    assert len(_router(off)._deployment_config.deployment_actors) == 2  # disabled by default
    in_process = build_app({"model": str(qwen3_tiny), "experts": experts})
    assert not _router(in_process)._deployment_config.deployment_actors


def test_the_adapter_unload_log_is_a_deployment_actor_when_routers_may_be_several(qwen3_tiny):
    def actors(router: dict) -> list[str]:
        app = build_app({"model": str(qwen3_tiny), "router": router})
        return [a.name for a in _router(app)._deployment_config.deployment_actors]

    assert actors({"num_replicas": 2}) == ["adapter-unloads"]
    assert actors({"autoscaling": {"min_replicas": 1, "max_replicas": 2}}) == ["adapter-unloads"]
    assert actors({"num_replicas": 1}) == []  # the replica an unload reaches is the only one


def test_router_autoscaling_and_fixed_replicas(qwen3_tiny):
    fixed = _router(build_app({"model": str(qwen3_tiny), "router": {"num_replicas": 3}}))
    assert fixed._deployment_config.num_replicas == 3
    assert fixed._deployment_config.autoscaling_config is None
    auto = {"autoscaling": {"min_replicas": 1, "max_replicas": 3}}
    scaled = _router(build_app({"model": str(qwen3_tiny), "router": auto}))
    cfg = scaled._deployment_config.autoscaling_config
    assert (cfg.min_replicas, cfg.max_replicas) == (1, 3)
    with pytest.raises(ValidationError):
        AppConfig.model_validate(
            {"model": "m", "router": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}}
        )


def test_router_autoscaling_selects_the_llm_policy_with_every_knob(qwen3_tiny):
    knobs = {
        "target_running_per_replica": 8,
        "max_waiting_per_replica": 1,
        "kv_high": 0.8,
        "ttft_slo_ms": 500,
        "upscale_step": 2,
        "upscale_cooldown_s": 5,
        "downscale_delay_s": 20,
        "downscale_band": 0.5,
    }
    auto = {"min_replicas": 0, "max_replicas": 3, "look_back_period_s": 4}
    auto |= {"metrics_interval_s": 1, "ttft_window_s": 30, **knobs}
    router = _router(build_app({"model": str(qwen3_tiny), "router": {"autoscaling": auto}}))
    cfg = router._deployment_config.autoscaling_config
    assert cfg.policy.policy_function == ROUTER_POLICY == "autoscaling.policy:ServePolicy"
    assert cfg.policy.policy_kwargs == knobs
    assert (cfg.min_replicas, cfg.max_replicas) == (0, 3)
    assert (cfg.look_back_period_s, cfg.metrics_interval_s) == (4, 1)
    # The policy does its own cooldown and hysteresis: Serve's wrapper must add no delay.
    assert (cfg.upscale_delay_s, cfg.downscale_delay_s) == (0, 0)
    # What the controller does with it: instantiate the class once with the kwargs.
    assert cfg.policy.get_policy() is ServePolicy
    policy = ServePolicy(**cfg.policy.policy_kwargs)
    assert policy.config == PolicyConfig(**knobs)
    assert router._deployment_config.graceful_shutdown_timeout_s == 120


def test_autoscaling_settings_mirror_the_policy_config():
    """Every PolicyConfig threshold is an app-config knob with the same default."""
    settings = AutoscalingSettings()
    policy = PolicyConfig()
    thresholds = {f.name for f in fields(PolicyConfig)} - {"min_replicas", "max_replicas"}
    assert set(settings.policy_kwargs()) == thresholds
    assert PolicyConfig(**settings.policy_kwargs()) == policy
    assert (settings.min_replicas, settings.max_replicas) == (1, 4)
    assert all(f.description for f in AutoscalingSettings.model_fields.values())
    for bad in ({"kv_high": 1.5}, {"downscale_band": 1}, {"upscale_step": 0}):
        with pytest.raises(ValidationError):
            AutoscalingSettings(**bad)


def test_bad_model_paths_are_refused_before_deploying(tmp_path, qwen3_tiny):
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        build_app({"model": str(tmp_path / "nowhere")})
    with pytest.raises(ValueError, match="dense"):
        build_app({"model": str(tiny_model_dir("llama")), "expert_parallel_size": 2})


def test_micro_batches_default_to_ping_pong_only_with_gpu_shards(qwen3_tiny):
    cpu = AppConfig.model_validate({"model": str(qwen3_tiny), "expert_parallel_size": 2})
    gpu = AppConfig.model_validate(
        {"model": str(qwen3_tiny), "expert_parallel_size": 2, "experts": {"num_gpus": 1}}
    )
    assert cpu.engine_config().num_micro_batches == 1
    assert gpu.engine_config().num_micro_batches == 2


def test_placement_resources_reach_routers_and_shards(qwen3_tiny):
    app = build_app(
        {
            "model": str(qwen3_tiny),
            "expert_parallel_size": 2,
            "router": {"num_gpus": 1, "resources": {"router": 1}},
            "experts": {"num_gpus": 0.5, "resources": {"expert": 1}},
        }
    )
    router = _router(app)
    opts = router._replica_config.ray_actor_options
    assert (opts["num_gpus"], opts["resources"]) == (1, {"router": 1})
    for shard in router._deployment_config.deployment_actors:
        assert shard.actor_options["num_gpus"] == 0.5
        assert shard.actor_options["resources"] == {"expert": 1}
        assert shard.init_args[2] == "cuda"  # shards with GPUs run their experts there
    plain = _router(build_app({"model": str(qwen3_tiny)}))
    assert plain._replica_config.ray_actor_options["resources"] == {}


@pytest.mark.parametrize("resources", [{"CPU": 2}, {"GPU": 1}, {"router": -1}])
def test_placement_resources_are_checked(resources):
    with pytest.raises(ValidationError):
        AppConfig.model_validate({"model": "m", "router": {"resources": resources}})
    with pytest.raises(ValidationError):
        AppConfig.model_validate({"model": "m", "experts": {"resources": resources}})


def test_prefix_affinity_routing_sets_the_request_router_of_the_routers(qwen3_tiny):
    from serve_app.deployments.replica_picker import PrefixAffinityReplicaPicker
    from serve_app.replica_picking.affinity import AffinityConfig

    router = {"routing": "prefix_affinity", "affinity": {"load_factor": 1.25, "stats_period_s": 1}}
    args = {"model": str(qwen3_tiny), "version": "v7", "router": router, "lora": {"max_loras": 3}}
    dep = _router(build_app(args))
    cfg = dep._deployment_config.request_router_config
    assert cfg.get_request_router_class() is PrefixAffinityReplicaPicker
    assert cfg.request_routing_stats_period_s == 1
    kwargs = dict(cfg.request_router_kwargs)
    assert kwargs.pop("version") == "v7"
    # the picker replays the replicas' adapter LRU, so it gets their lora.max_loras
    assert AffinityConfig(**kwargs) == AffinityConfig(load_factor=1.25, max_loras=3)
    # A rollout version's routers (their own app) carry their own version's router.
    from serve_app.deployments.version_app import build_version_app

    version = build_version_app({"model": str(qwen3_tiny), "version": "v8", "router": router})
    vcfg = version._bound_deployment._deployment_config.request_router_config
    assert vcfg.request_router_kwargs["version"] == "v8"
    pow2 = _router(build_app({"model": str(qwen3_tiny)}))._deployment_config
    assert pow2.request_router_config.get_request_router_class() is not (
        PrefixAffinityReplicaPicker
    )
    with pytest.raises(ValidationError):
        AppConfig.model_validate({"model": "m", "router": {"routing": "random"}})
    with pytest.raises(ValidationError):
        AppConfig.model_validate({"model": "m", "router": {"affinity": {"load_factor": 0.9}}})
