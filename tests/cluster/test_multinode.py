"""Several Ray nodes on one machine (ray.cluster_utils.Cluster): a head, a `router` node and an
`expert` node (custom resources). The app from a cluster-style config is placed on the node
types it asks for and serves requests; losing the expert node moves the shards to a spare one,
and with no expert node left requests end with a clear 503, never a hang.

NOTE: needs its own Ray in this process, so it must run before any test that leaves a Ray up
(the e2e session fixture); `tests/cluster` sorts before `tests/e2e`, and the fixture skips
with a reason otherwise.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import httpx
import pytest

from tests.conftest import free_port, wait_healthy

pytestmark = pytest.mark.slow

CALL_TIMEOUT_S = 15  # experts.call_timeout_s: how long a router waits for a missing shard


@dataclass
class MultiNode:
    cluster: object  # ray.cluster_utils.Cluster
    url: str
    router_node: object  # ray._private.node.Node
    expert_node: object


@pytest.fixture(scope="module")
def multinode(qwen3_tiny):
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from serve_app.builder import build_app

    if ray.is_initialized():
        pytest.skip("another test's Ray is up in this process; run tests/cluster first or alone")
    # NOTE: Cluster records its address in $RAY_TMPDIR/ray/ray_current_cluster, and any
    # `ray.init()` on this machine (other people's tests too) would join it: keep it private.
    tmp = tempfile.mkdtemp(prefix="mn", dir="/tmp")  # short: Ray's socket paths have a limit
    env = {"RAY_TMPDIR": tmp, "RAY_SERVE_DEPLOYMENT_ACTOR_HEALTH_CHECK_PERIOD_S": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        router_node = cluster.add_node(num_cpus=1, resources={"router": 1})
        expert_node = cluster.add_node(num_cpus=1, resources={"expert": 2})
        ray.init(address=cluster.address, log_to_driver=False)
        port = free_port()
        # One proxy: every "node" shares this machine's IP, so one port per proxy would clash.
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        app = build_app(
            {
                "model": str(qwen3_tiny),
                "served_model_name": "tiny",
                "expert_parallel_size": 2,
                "engine": {"num_kv_blocks": 64, "max_model_len": 256},
                "prefix_cache": {"enabled": False},
                "router": {"num_replicas": 1, "num_cpus": 0, "resources": {"router": 1}},
                "experts": {
                    "num_cpus": 0,
                    "resources": {"expert": 1},
                    "call_timeout_s": CALL_TIMEOUT_S,
                },
            }
        )
        serve.run(app, name="moeserve", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, timeout_s=240)
        yield MultiNode(cluster, url, router_node, expert_node)
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)


def _complete(url: str, timeout_s: float = 60) -> httpx.Response:
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 4, "ignore_eos": True}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=timeout_s)


def _router_node_id() -> str:
    from ray import serve

    handle = serve.get_deployment_handle("router", app_name="moeserve")
    return handle.info.remote().result(timeout_s=30).node_id


def _shard_node_ids() -> dict[str, str]:
    """shard name -> node id, for the expert shard actors that are alive now."""
    import ray

    out = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        if "experts-" not in a["name"]:
            continue
        try:
            h = ray.get_actor(a["name"], namespace=a["namespace"])
            out[a["name"]] = ray.get(h.info.remote(), timeout=10)["node_id"]
        except (ValueError, ray.exceptions.RayError):  # dying or being recreated
            continue
    return out


def test_routers_and_shards_land_on_their_node_types(multinode):
    assert _router_node_id() == multinode.router_node.node_id
    shards = _shard_node_ids()
    assert len(shards) == 2
    assert set(shards.values()) == {multinode.expert_node.node_id}
    r = _complete(multinode.url)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4


def test_losing_expert_nodes_restarts_shards_elsewhere_then_degrades_to_503(multinode):
    cluster = multinode.cluster
    spare = cluster.add_node(num_cpus=1, resources={"expert": 2})
    cluster.remove_node(multinode.expert_node, allow_graceful=False)

    # The controller recreates both shards on the spare node; the routers re-resolve them.
    deadline = time.monotonic() + 180
    while True:
        shards = _shard_node_ids()
        if len(shards) == 2 and set(shards.values()) == {spare.node_id}:
            break
        assert time.monotonic() < deadline, f"shards not recreated on the spare node: {shards}"
        time.sleep(1)
    wait_healthy(multinode.url, timeout_s=120)  # the ingress too, if it was on the lost node
    statuses = []
    while True:  # the first calls may still meet a dead handle: 200 or a clear 503, no hang
        r = _complete(multinode.url, timeout_s=CALL_TIMEOUT_S + 45)
        statuses.append(r.status_code)
        if r.status_code == 200:
            break
        assert r.status_code == 503 and time.monotonic() < deadline, (statuses, r.text)
        time.sleep(1)
    assert _router_node_id() == multinode.router_node.node_id

    # No node offers `expert` any more: the shards cannot come back. /health says so (503,
    # degraded, which shards), and a request ends with an OpenAI-shaped 503 within the
    # router's call timeout instead of waiting forever.
    cluster.remove_node(spare, allow_graceful=False)
    deadline = time.monotonic() + 120
    while True:
        h = _health(multinode.url)
        if h is not None and h[1].get("experts_unavailable") == [0, 1]:
            break
        assert time.monotonic() < deadline, f"no degraded status: {h}"
        time.sleep(1)
    assert h[0] == 503 and h[1]["status"] == "degraded"
    start = time.monotonic()
    r = _complete(multinode.url, timeout_s=CALL_TIMEOUT_S + 45)
    assert r.status_code == 503, r.text
    assert "expert shard" in r.json()["error"]["message"]
    assert time.monotonic() - start < CALL_TIMEOUT_S + 30


def _health(url: str) -> tuple[int, dict] | None:
    """(status code, body) of /health, or None while nothing answers (an ingress restarting)."""
    try:
        r = httpx.get(f"{url}/health", timeout=10)
        return r.status_code, r.json()
    except (httpx.HTTPError, ValueError):
        return None
