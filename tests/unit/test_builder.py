"""build_app wires the config into Serve deployments before anything runs (no cluster)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serve_app.builder import build_app
from serve_app.config import AppConfig
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


def test_router_autoscaling_and_fixed_replicas(qwen3_tiny):
    fixed = _router(build_app({"model": str(qwen3_tiny), "router": {"num_replicas": 3}}))
    assert fixed._deployment_config.num_replicas == 3
    auto = {"autoscaling": {"min_replicas": 1, "max_replicas": 3}}
    scaled = _router(build_app({"model": str(qwen3_tiny), "router": auto}))
    cfg = scaled._deployment_config.autoscaling_config
    assert (cfg.min_replicas, cfg.max_replicas) == (1, 3)
    with pytest.raises(ValidationError):
        AppConfig.model_validate(
            {"model": "m", "router": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}}
        )


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
