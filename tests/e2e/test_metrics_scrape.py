"""/metrics of the Serve app (ingress + router + 2 expert shards on a real local Ray), and a real
Prometheus server that scrapes it, loads the alert rules and answers PromQL."""

from __future__ import annotations

import math
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from serve_app.procs import free_port
from tests.conftest import wait_until
from tests.prom import prom_binary

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TTFT_P99 = (
    "histogram_quantile(0.99, sum by (le) "
    '(rate(moeserve_time_to_first_token_seconds_bucket{job="moeserve"}[1m])))'
)
REQUEST_RATE = 'sum(rate(moeserve_requests_total{job="moeserve"}[1m]))'


def scrape(url: str) -> list:
    r = httpx.get(f"{url}/metrics", timeout=30)
    assert r.status_code == 200, r.text
    return [s for fam in text_string_to_metric_families(r.text) for s in fam.samples]


def complete(url: str, n: int = 1, max_tokens: int = 4) -> None:
    for _ in range(n):
        body = {"prompt": "The river bends", "max_tokens": max_tokens, "ignore_eos": True}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text


def wait_for(what: str, check, timeout: float = 120.0):
    return wait_until(check, timeout, every=1.0, what=what)


def missing_series(samples: list, healthy_seen: set | None = None) -> list[str]:
    """What the page still lacks: a series from the ingress, the router, both expert shards
    (memory: one series per process) and Serve's replica gauges.

    healthy_seen: deployments whose replica_healthy gauge earlier scrapes showed. Serve sets it
    at each replica health check (every 10 s) and Ray drops a gauge two report intervals (1 s
    here) after its last set, so the two deployments' gauges are rarely on the same page."""
    by_name: dict[str, list] = {}
    for sample in samples:
        by_name.setdefault(sample.name, []).append(sample)
    wanted = [
        "moeserve_requests_total",
        "moeserve_time_to_first_token_seconds_bucket",
        "moeserve_kv_cache_total_blocks",
        "moeserve_expert_shard_tokens_total",
        "moeserve_expert_tokens_total",
        "ray_serve_deployment_replica_healthy",
    ]
    gone = [n for n in wanted if n not in by_name]
    workers = {x.labels["worker"] for x in by_name.get("moeserve_host_memory_total_bytes", [])}
    if len(workers) < 3:
        gone.append(f"host memory from router + 2 shards (workers: {len(workers)})")
    healthy = by_name.get("ray_serve_deployment_replica_healthy", [])
    seen = healthy_seen if healthy_seen is not None else set()
    seen |= {x.labels.get("deployment") for x in healthy}
    if not {"ingress", "router"} <= seen:
        gone.append("replica_healthy of ingress and router")
    return gone


def test_one_metrics_page_covers_ingress_routers_and_shards(serve_app):
    complete(serve_app.url, 2)
    last: list = []
    healthy_seen: set = set()

    def ready():
        last[:] = scrape(serve_app.url)
        return not missing_series(last, healthy_seen)

    deadline = time.monotonic() + 120
    while not ready():
        lacks = missing_series(last, healthy_seen)
        assert time.monotonic() < deadline, f"/metrics still lacks {lacks}"
        time.sleep(1)
    by_name: dict[str, list] = {}
    for x in last:
        by_name.setdefault(x.name, []).append(x)
    ok = [
        x
        for x in by_name["moeserve_requests_total"]
        if x.labels["code"] == "200" and x.labels["route"] == "/v1/completions"
    ]
    # version: the app's version name (no `version:` in its config: the model directory's);
    # NOTE: the cluster's page may still carry counters of apps earlier tests deleted
    mine = [x for x in ok if x.labels["version"] == serve_app.model.name]
    assert mine, [x.labels for x in ok]
    assert "worker" in mine[0].labels and "SessionName" not in mine[0].labels
    assert [x.value for x in by_name["moeserve_kv_cache_total_blocks"]] == [256]
    shards = {x.labels["shard"] for x in by_name["moeserve_expert_shard_tokens_total"]}
    assert shards == {"0", "1"}
    assert not any(n.startswith(("ray_moeserve_", "python_")) for n in by_name)


def test_prometheus_scrapes_the_app_and_answers_promql(serve_app, tmp_path):
    import ray

    prometheus = prom_binary("prometheus")
    complete(serve_app.url)  # the series exist before the first scrape: rate() needs two points
    wait_for("requests on /metrics", lambda: "moeserve_requests_total" in httpx.get(
        f"{serve_app.url}/metrics", timeout=30).text)  # fmt: skip
    agents = [
        f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in ray.nodes() if n["Alive"]
    ]
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(REPO / "manifests" / "alerts.yaml")],
        "scrape_configs": [
            {
                "job_name": "moeserve",
                "static_configs": [{"targets": [serve_app.url.removeprefix("http://")]}],
            },
            # docs/metrics.md: scraping Ray's node agents directly, with ray_ stripped
            {
                "job_name": "ray-nodes",
                "static_configs": [{"targets": agents}],
                "metric_relabel_configs": yaml.safe_load(
                    (REPO / "manifests" / "prometheus" / "ray-node-relabel.yaml").read_text()
                ),
            },
        ],
    }
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(yaml.safe_dump(config))
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [
            prometheus,
            f"--config.file={cfg}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    api = f"http://127.0.0.1:{port}/api/v1"

    def query(q: str) -> list:
        r = httpx.get(f"{api}/query", params={"query": q}, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()["data"]["result"]

    def number(q: str) -> float | None:
        result = query(q)
        value = float(result[0]["value"][1]) if result else math.nan
        return None if math.isnan(value) else value

    try:
        up = 'up{job="moeserve"} == 1'
        wait_for("Prometheus up and scraping /metrics", lambda: _answers(api) and query(up))
        time.sleep(2)  # two scrapes before the load
        complete(serve_app.url, 6)
        p99 = wait_for("TTFT P99", lambda: number(TTFT_P99))
        rate = wait_for("request rate", lambda: number(REQUEST_RATE))
        assert 0 < p99 < 60
        assert rate > 0
        direct = wait_for(
            "relabelled node-agent series",
            lambda: query('moeserve_requests_total{job="ray-nodes"}'),
        )
        assert direct and not query('{__name__=~"ray_moeserve_.*"}')
        rules = httpx.get(f"{api}/rules", timeout=10).json()["data"]["groups"]
        loaded = [r for g in rules for r in g["rules"]]
        assert len(loaded) == 7 and all(r["health"] == "ok" for r in loaded), loaded
    except AssertionError:
        log.flush()
        print((tmp_path / "prometheus.log").read_text()[-3000:])
        raise
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def _answers(api: str) -> bool:
    try:
        return httpx.get(api.removesuffix("/api/v1") + "/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
