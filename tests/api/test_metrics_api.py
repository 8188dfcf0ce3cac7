"""GET /metrics of the in-process server: request, token and engine metrics after real requests."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serve_app.api.routes import create_app
from serve_app.engine.config import EngineConfig
from serve_app.metrics import get_metrics
from serve_app.metrics.reporter import start_engine_reporter
from serve_app.runtime.factory import build_async_engine
from serve_app.tools.local_client import LocalEngineClient
from tests.api.inproc import serving

COMPLETIONS = {"route": "/v1/completions", "version": "tiny"}


@pytest.fixture(scope="module")
def url(qwen3_tiny):
    engine = build_async_engine(
        EngineConfig(model=str(qwen3_tiny), num_kv_blocks=96, max_model_len=512)
    )
    app = create_app(LocalEngineClient(engine, "tiny"), api_keys=frozenset())
    reporter = start_engine_reporter(get_metrics(), engine, "tiny", "local", interval_s=0.1)
    with serving(app) as url:
        yield url
    reporter.stop()
    engine.shutdown()


def scrape(url: str) -> dict[tuple, float]:
    r = httpx.get(f"{url}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(r.text)
        for s in fam.samples
    }


def key(name: str, **labels: str) -> tuple:
    return (name, tuple(sorted(labels.items())))


def test_requests_tokens_and_latencies_are_counted(url):
    before = scrape(url)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    r = client.completions.create(model="tiny", prompt="Hello there", max_tokens=6,
                                  temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    assert len([c for c in stream]) > 0
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    after = scrape(url)

    def delta(name: str, **labels: str) -> float:
        k = key(name, **labels)
        return after.get(k, 0.0) - before.get(k, 0.0)

    assert delta("moeserve_requests_total", code="200", **COMPLETIONS) == 1
    assert delta("moeserve_requests_total", code="404", **COMPLETIONS) == 1
    chat = {"route": "/v1/chat/completions", "version": "tiny"}
    assert delta("moeserve_requests_total", code="200", **chat) == 1
    assert delta("moeserve_request_duration_seconds_count", code="200", **chat) == 1
    assert delta("moeserve_prompt_tokens_total", **COMPLETIONS) == r.usage.prompt_tokens
    assert delta("moeserve_generation_tokens_total", **COMPLETIONS) == 6
    assert delta("moeserve_generation_tokens_total", **chat) == 4
    assert delta("moeserve_time_to_first_token_seconds_count", **COMPLETIONS) == 1
    assert delta("moeserve_time_per_output_token_seconds_count", **chat) == 1
    ttft = delta("moeserve_time_to_first_token_seconds_sum", **COMPLETIONS)
    e2e = delta("moeserve_request_duration_seconds_sum", code="200", **COMPLETIONS)
    assert 0 < ttft <= e2e < 60
    # probes are not timed
    assert not any(
        k[0] == "moeserve_requests_total" and ("route", "/health") in k[1] for k in after
    )


def test_engine_gauges_and_counters(url):
    httpx.post(f"{url}/v1/completions", json={"prompt": "abc " * 40, "max_tokens": 2}, timeout=60)
    httpx.post(f"{url}/v1/completions", json={"prompt": "abc " * 40, "max_tokens": 2}, timeout=60)
    time.sleep(0.5)  # a few reporter ticks
    got = scrape(url)
    r = {"replica": "local", "version": "tiny"}
    assert got[key("moeserve_kv_cache_total_blocks", **r)] == 96
    assert 0 <= got[key("moeserve_kv_cache_usage_ratio", **r)] <= 1
    assert got[key("moeserve_running_requests", **r)] == 0
    # the second identical prompt hits the first one's blocks in the local prefix cache
    assert got[key("moeserve_prefix_cache_hit_tokens_total", **r, tier="local")] > 0
    experts = [v for (n, _), v in got.items() if n == "moeserve_expert_tokens_total"]
    assert len(experts) > 1 and sum(experts) > 0
    assert got[key("moeserve_host_memory_total_bytes", node=_node(got))] > 0


def _node(got: dict) -> str:
    return next(dict(k[1])["node"] for k in got if k[0] == "moeserve_host_memory_used_bytes")
