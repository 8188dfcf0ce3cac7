"""cluster/cluster.yaml and cluster/local.yaml pass Ray's own cluster-launcher checks offline
(prepare_config fills the provider's defaults from Ray's bundled defaults.yaml, no cloud call;
validate_config applies ray-schema.json), and a misspelt key is refused."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.providers import _get_default_config
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
SCHEMA = json.loads(
    (Path(prepare_config.__code__.co_filename).parents[1] / "ray-schema.json").read_text()
)


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _check(config: dict) -> dict:
    """Ray's checks, plus the provider section, which ray-schema.json leaves open: every key
    must be one the schema names or one Ray's defaults for that provider use."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    provider = config["provider"]
    known = set(SCHEMA["properties"]["provider"]["properties"])
    known |= set(_get_default_config(provider).get("provider", {}))
    if provider["type"] == "local":
        known |= {"coordinator_address", "external_head_ip"}
    unknown = set(provider) - known
    if unknown:
        raise ValueError(f"unknown provider keys: {sorted(unknown)}")
    return prepared


def test_aws_cluster_has_cpu_head_and_gpu_router_and_expert_types():
    cfg = _check(_load("cluster.yaml"))
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["node_config"]["InstanceType"].startswith("m")  # CPU only
    assert head["max_workers"] == 0
    assert types["router"]["resources"] == {"router": 1}
    assert types["expert"]["resources"] == {"expert": 4}
    for name in ("router", "expert"):
        t = types[name]
        assert t["node_config"]["InstanceType"].startswith("g")  # GPU instances
        assert 1 <= t["min_workers"] <= t["max_workers"]
    assert sum(types[n]["max_workers"] for n in ("router", "expert")) == cfg["max_workers"]
    setup = " ".join(cfg["setup_commands"])
    assert "pip install -q -e ~/moeserve" in setup and "redis-server" in setup


def test_local_cluster_uses_the_same_node_script():
    cfg = _check(_load("local.yaml"))
    assert cfg["provider"]["type"] == "local"
    assert len(cfg["provider"]["worker_ips"]) == cfg["max_workers"]
    aws = _load("cluster.yaml")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert cfg[key][-1].endswith(aws[key][-1])  # both start Ray through start-node.sh


@pytest.mark.parametrize(
    "path",
    [
        ("setup_comands",),
        ("available_node_types", "router", "resorces"),
        ("available_node_types", "expert", "max_worker"),
        ("auth", "ssh_usr"),
        ("provider", "regoin"),
    ],
)
def test_misspelt_keys_are_refused(path):
    cfg = _load("cluster.yaml")
    node = cfg
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = 1
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _check(cfg)


@pytest.mark.parametrize(
    "mutate, error",
    [
        (lambda c: c.update(setup_comands=[]), jsonschema.ValidationError),
        (lambda c: c["provider"].update(head_ipp="10.0.0.9"), ValueError),
        # Ray's own check for the local provider (it aborts through click)
        (lambda c: c["provider"].update(worker_ip=c["provider"].pop("worker_ips")), Exception),
    ],
)
def test_local_misspelt_keys_are_refused(mutate, error):
    cfg = _load("local.yaml")
    mutate(cfg)
    with pytest.raises(error):
        _check(cfg)


def test_node_start_script_parses():
    subprocess.run(["bash", "-n", str(CLUSTER / "start-node.sh")], check=True)
