"""`import_path: serve_app.builder:build_app`: the Serve application from an AppConfig."""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from serve_app.config import AppConfig
from serve_app.deployments.ingress import Ingress
from serve_app.deployments.router import Router


def build_app(args: dict[str, Any] | AppConfig) -> Application:
    """Validate the config (before anything is deployed) and wire ingress -> routers."""
    config = args if isinstance(args, AppConfig) else AppConfig.model_validate(args)
    r = config.router
    router = serve.deployment(Router).options(
        name="router",
        num_replicas=r.num_replicas,
        max_ongoing_requests=r.max_ongoing_requests,
        ray_actor_options={"num_cpus": r.num_cpus, "num_gpus": r.num_gpus},
        health_check_period_s=10,
    )
    ingress = serve.deployment(Ingress).options(
        name="ingress", max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0}
    )
    return ingress.bind(router.bind(config), config)
