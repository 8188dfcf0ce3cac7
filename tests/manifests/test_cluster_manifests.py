"""The Serve configs parse with Serve's own schema and build; the KubeRay RayService carries
the very same Serve config; and what the app asks of Ray (GPUs, `router` / `expert`
resources) is offered by the node types of cluster/cluster.yaml and of the RayService,
as Ray's own KubeRay autoscaler reads them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import (
    _derive_autoscaling_config_from_ray_cr,
)
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeDeploySchema

from serve_app.builder import build_app
from serve_app.config import AppConfig

REPO = Path(__file__).resolve().parents[2]
SERVE_MANIFESTS = ["serve.yaml", "serve-cluster.yaml"]


def _serve_config(name: str) -> dict:
    return yaml.safe_load((REPO / "manifests" / name).read_text())


def _kuberay() -> dict[str, dict]:
    docs = yaml.safe_load_all((REPO / "manifests/kuberay/rayservice.yaml").read_text())
    return {d["kind"]: d for d in docs}


def _app_args(serve_config: dict) -> dict:
    (app,) = ServeDeploySchema.model_validate(serve_config).applications
    assert app.import_path == "serve_app.builder:build_app"
    return app.args


@pytest.mark.parametrize("name", SERVE_MANIFESTS)
def test_serve_manifest_parses_and_builds(name, qwen3_tiny):
    raw = _serve_config(name)
    args = _app_args(raw)
    AppConfig.model_validate(args)
    for app in raw["applications"]:  # per-deployment overrides, if any
        for dep in app.get("deployments", []):
            if "autoscaling_config" in dep:
                AutoscalingConfig(**dep["autoscaling_config"])
    # Build it for real (with a checkpoint that exists here): Serve's own AutoscalingConfig
    # and actor options are what `serve deploy` would hand to the controller.
    app = build_app({**args, "model": str(qwen3_tiny)})
    router = app._bound_deployment.init_args[0]._bound_deployment
    auto = args["router"].get("autoscaling")
    cfg = router._deployment_config.autoscaling_config
    if auto is None:
        assert cfg is None
    else:
        assert isinstance(cfg, AutoscalingConfig)
        assert AutoscalingConfig(**cfg.model_dump()).max_replicas == auto["max_replicas"]


def test_cluster_manifest_places_routers_and_experts_on_gpu_node_types(qwen3_tiny):
    args = _app_args(_serve_config("serve-cluster.yaml"))
    app = build_app({**args, "model": str(qwen3_tiny)})
    router = app._bound_deployment.init_args[0]._bound_deployment
    opts = router._replica_config.ray_actor_options
    assert opts["num_gpus"] == 1 and opts["resources"] == {"router": 1}
    actors = router._deployment_config.deployment_actors
    shards = [a for a in actors if a.name.startswith("experts-")]
    assert len(shards) == args["expert_parallel_size"]
    # several router replicas: their adapter unload log too, on no GPU
    (log,) = [a for a in actors if a.name == "adapter-unloads"]
    assert log.actor_options == {"num_cpus": 0}
    for shard in shards:
        assert shard.actor_options["num_gpus"] == 1
        assert shard.actor_options["resources"] == {"expert": 1}
        assert shard.init_args[2] == "cuda"


def test_kuberay_serve_config_is_the_cluster_manifest():
    rs = _kuberay()["RayService"]
    assert (rs["apiVersion"], rs["kind"]) == ("ray.io/v1", "RayService")
    embedded = yaml.safe_load(rs["spec"]["serveConfigV2"])
    # NOTE: edit manifests/serve-cluster.yaml and the RayService's serveConfigV2 together.
    assert embedded == _serve_config("serve-cluster.yaml")


def _needs(args: dict) -> dict[str, dict[str, float]]:
    """What one router replica and one expert shard ask Ray for (pure, from the args)."""
    cfg = AppConfig.model_validate(args)
    return {
        "router": {"CPU": cfg.router.num_cpus, "GPU": cfg.router.num_gpus, **cfg.router.resources},
        "expert": {
            "CPU": cfg.experts.num_cpus,
            "GPU": cfg.experts.num_gpus,
            **cfg.experts.resources,
        },
    }


def _fits(need: dict[str, float], offer: dict[str, float]) -> int:
    """How many `need`s one node offering `offer` holds. CPU/GPU missing from `offer` are
    detected when the node starts (ray up reads them from the instance type): not limiting."""
    counts = [
        offer[k] // v if k in offer else (float("inf") if k in ("CPU", "GPU") else 0)
        for k, v in need.items()
        if v > 0
    ]
    return int(min(counts, default=1))


def test_kuberay_groups_offer_what_the_app_asks():
    rs = _kuberay()["RayService"]
    cr = {"metadata": {"name": "moeserve", "namespace": "default"}}
    cr["spec"] = rs["spec"]["rayClusterConfig"]
    types = _derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]
    args = _app_args(yaml.safe_load(rs["spec"]["serveConfigV2"]))
    need = _needs(args)
    head = types["headgroup"]["resources"]
    assert head["CPU"] == 0 and "GPU" not in head
    router, expert = types["router"]["resources"], types["expert"]["resources"]
    assert (router["GPU"], router["router"]) == (1, 1) and "expert" not in router
    assert (expert["GPU"], expert["expert"]) == (4, 4) and "router" not in expert
    assert _fits(need["router"], router) >= 1
    assert _fits(need["router"], expert) == 0  # routers never land on expert pods
    per_pod = _fits(need["expert"], expert)
    assert per_pod * types["expert"]["max_workers"] >= args["expert_parallel_size"]
    max_routers = args["router"]["autoscaling"]["max_replicas"]
    assert _fits(need["router"], router) * types["router"]["max_workers"] >= max_routers


def test_ray_up_node_types_offer_what_the_app_asks():
    cluster = yaml.safe_load((REPO / "cluster/cluster.yaml").read_text())
    types = cluster["available_node_types"]
    args = _app_args(_serve_config("serve-cluster.yaml"))
    need = _needs(args)
    router, expert = types["router"], types["expert"]
    assert _fits(need["router"], router["resources"]) >= 1
    assert (
        _fits(need["expert"], expert["resources"]) * expert["max_workers"]
        >= (args["expert_parallel_size"])
    )
    head = types[cluster["head_node_type"]]["resources"]
    assert _fits(need["router"], head) == 0 and _fits(need["expert"], head) == 0
    assert router["max_workers"] >= args["router"]["autoscaling"]["max_replicas"]


def test_kuberay_redis_and_monitoring_are_wired():
    docs = _kuberay()
    svc = docs["Service"]
    assert svc["metadata"]["name"] == "moeserve-redis"
    dep_labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= dep_labels.items()
    spec = docs["RayService"]["spec"]["rayClusterConfig"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        (container,) = group["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert "@moeserve-redis:6379/" in env["MOESERVE_REDIS_URL"]["value"]
        assert "metrics" in {p["name"] for p in container["ports"]}
    monitor = docs["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["selector"]["matchLabels"] == {"ray.io/node-type": "head"}
