"""`import_path: serve_app.builder:build_app`: the Serve application from an AppConfig.

ingress -> the base version's routers (serve_app/deployments/version_app.py) -> expert shards.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from serve_app.config import AppConfig
from serve_app.deployments.ingress import Ingress
from serve_app.deployments.version_app import router_deployment, validated_config


def build_app(args: dict[str, Any] | AppConfig) -> Application:
    """Validate the config (before anything is deployed) and wire ingress -> routers.

    The routers bound here serve the app's base version; `moeserve rollout start` deploys
    other versions with build_version_app, each as its own application.
    """
    config = validated_config(args)
    ingress = serve.deployment(Ingress).options(
        name="ingress", max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0}
    )
    return ingress.bind(router_deployment(config).bind(config), config)
