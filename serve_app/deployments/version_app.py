"""A model version's deployments: router replicas -> (expert_parallel_size > 0) expert shards.

The base app (serve_app/builder.py: the ingress in front) binds them for its first version;
the rollout controller (deployments/rollout_actor.py) deploys every other version with
build_version_app, as its own application. The shards are deployment-scoped actors of the
router deployment (Ray Serve 2.60): one set of N shards is shared by all M router replicas,
started before the routers, recreated by the Serve controller when one dies, and removed with
the application. So is the adapter unload log of a deployment that may run several router
replicas (deployments/adapter_unloads.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application, Deployment
from ray.serve.config import DeploymentActorConfig, RequestRouterConfig

from serve_app.config import AppConfig, AutoscalingSettings
from serve_app.deployments.adapter_unloads import unloads_actor
from serve_app.deployments.balancer_actor import ExpertBalancerActor
from serve_app.deployments.expert_actor import ExpertShardActor
from serve_app.deployments.router import (
    BALANCER_ACTOR_NAME,
    Router,
    expert_placement,
    shard_actor_name,
)
from serve_app.experts.placement import Placement


def build_version_app(args: dict[str, Any] | AppConfig) -> Application:
    """A rollout version: its routers and expert shards, no HTTP route (the ingress of the
    base app reaches them through a handle)."""
    config = validated_config(args)
    return router_deployment(config).bind(config)


def router_deployment(config: AppConfig) -> Deployment:
    r = config.router
    return serve.deployment(Router).options(
        name="router",
        **router_scaling(r.num_replicas, r.autoscaling),
        max_ongoing_requests=r.max_ongoing_requests,
        graceful_shutdown_timeout_s=r.graceful_shutdown_timeout_s,
        ray_actor_options={
            "num_cpus": r.num_cpus,
            "num_gpus": r.num_gpus,
            "resources": dict(r.resources),
        },
        health_check_period_s=10,
        deployment_actors=expert_actors(config) + unloads_actor(config),
        **request_routing(config),
    )


AFFINITY_ROUTER = "serve_app.deployments.replica_picker:PrefixAffinityReplicaPicker"


def request_routing(config: AppConfig) -> dict[str, Any]:
    """Deployment options for `router.routing`: none for pow2 (Serve's default)."""
    r = config.router
    if r.routing == "pow2":
        return {}
    a = r.affinity
    # the replicas' adapter LRU is replayed at the picker: it needs their capacity
    affinity = dataclasses.replace(a.affinity_config(), max_loras=config.lora.max_loras)
    kwargs = {"version": config.version_name, **dataclasses.asdict(affinity)}
    return {
        "request_router_config": RequestRouterConfig(
            request_router_class=AFFINITY_ROUTER,
            request_router_kwargs=kwargs,
            request_routing_stats_period_s=a.stats_period_s,
        )
    }


def validated_config(args: dict[str, Any] | AppConfig) -> AppConfig:
    config = args if isinstance(args, AppConfig) else AppConfig.model_validate(args)
    return _absolute_model_path(config)


# The router policy: a class, because Serve 2.60 passes policy_kwargs to classes only.
ROUTER_POLICY = "autoscaling.policy:ServePolicy"


def router_scaling(num_replicas: int, autoscaling: AutoscalingSettings | None) -> dict[str, Any]:
    """Serve deployment options: a fixed count, or the LLM-signal policy with the app's knobs.

    NOTE: Serve wraps every custom policy with its own upscale/downscale delays (defaults 30 s
    and 600 s); they are set to 0 because the policy does its own cooldown and hysteresis.
    """
    if autoscaling is None:
        return {"num_replicas": num_replicas}
    a = autoscaling
    return {
        "autoscaling_config": {
            "min_replicas": a.min_replicas,
            "max_replicas": a.max_replicas,
            "look_back_period_s": a.look_back_period_s,
            "metrics_interval_s": a.metrics_interval_s,
            "upscale_delay_s": 0.0,
            "downscale_delay_s": 0.0,
            "policy": {"policy_function": ROUTER_POLICY, "policy_kwargs": a.policy_kwargs()},
        }
    }


def expert_actors(config: AppConfig) -> list[DeploymentActorConfig]:
    """The shard actors and the balancer, from one placement (the model spec read once)."""
    if config.expert_parallel_size == 0:
        return []
    placement = expert_placement(config)
    return expert_shard_actors(config, placement) + expert_balancer_actor(config, placement)


def expert_shard_actors(config: AppConfig, placement: Placement) -> list[DeploymentActorConfig]:
    """One actor per shard, each given the experts place_experts assigns it."""
    e = config.experts
    threads = e.num_threads or max(1, round(e.num_cpus))
    device = "cuda" if e.num_gpus > 0 else "cpu"
    return [
        DeploymentActorConfig(
            name=shard_actor_name(i),
            actor_class=ExpertShardActor,
            init_args=(
                config.model,
                list(owned),
                device,
                config.engine.dtype,
                threads,
                config.engine.quantization,
                config.engine.quantization_group_size,
                config.lora.max_loras,
            ),
            actor_options={
                "num_cpus": e.num_cpus,
                "num_gpus": e.num_gpus,
                "resources": dict(e.resources),
            },
        )
        for i, owned in enumerate(placement.shards)
    ]


def expert_balancer_actor(config: AppConfig, placement: Placement) -> list[DeploymentActorConfig]:
    """The balancer (experts.rebalance.enabled): one actor for all routers, no CPU reserved
    (it sleeps between moves; the shards load the weights)."""
    if not config.experts.rebalance.enabled:
        return []
    shards = [list(s) for s in placement.shards]
    return [
        DeploymentActorConfig(
            name=BALANCER_ACTOR_NAME,
            actor_class=ExpertBalancerActor,
            init_args=(
                placement.num_experts,
                shards,
                config.experts.rebalance.balancer_config(),
                config.experts.call_timeout_s,
            ),
            actor_options={"num_cpus": 0},
        )
    ]


def _absolute_model_path(config: AppConfig) -> AppConfig:
    """Replicas and actors may run with another working directory than the builder.

    NOTE: under `serve deploy` the builder runs in the Serve controller, whose working
    directory is wherever `ray start` ran: a relative path is resolved there, and a path
    that is not a directory would otherwise be taken for a Hub id by transformers (and hang on
    the network) inside every replica, so it is refused here, before anything is deployed.
    """
    path = Path(config.model).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(
            f"model {config.model!r} is not a checkpoint directory (no config.json) as seen from "
            f"{Path.cwd()}; use an absolute path that exists on the cluster's nodes"
        )
    return config.model_copy(update={"model": str(path.resolve())})
