"""Two ways to record the catalog's metrics, behind one small interface.

LocalBackend: prometheus-client in this process (the in-process server, unit tests).
RayBackend: ray.util.metrics; every process's records go to its node's metrics agent, and
`exposition()` merges the agents' pages (serve_app.metrics.exposition). Why Ray's pipeline and
not prometheus-client's multiprocess mode: docs/metrics.md.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.request
from abc import ABC, abstractmethod
from typing import Any

from serve_app.metrics.catalog import SERVE_PASSTHROUGH, MetricSpec

log = logging.getLogger(__name__)

Labels = dict[str, str]


class Instrument(ABC):
    """One metric family; `labels` must name exactly the spec's labels."""

    @abstractmethod
    def inc(self, value: float, labels: Labels) -> None: ...

    @abstractmethod
    def set(self, value: float, labels: Labels) -> None: ...

    @abstractmethod
    def observe(self, value: float, labels: Labels) -> None: ...


class Backend(ABC):
    @abstractmethod
    def instrument(self, spec: MetricSpec) -> Instrument: ...

    @abstractmethod
    async def exposition(self) -> str:
        """The whole app's metrics as Prometheus text (format 0.0.4)."""


# ---- prometheus-client, one process -------------------------------------------------------


class _PromInstrument(Instrument):
    def __init__(self, metric: Any):
        self.metric = metric

    def inc(self, value: float, labels: Labels) -> None:
        self.metric.labels(**labels).inc(value)

    def set(self, value: float, labels: Labels) -> None:
        self.metric.labels(**labels).set(value)

    def observe(self, value: float, labels: Labels) -> None:
        self.metric.labels(**labels).observe(value)


class LocalBackend(Backend):
    """Its own CollectorRegistry, so two backends (tests) never collide."""

    def __init__(self) -> None:
        import prometheus_client as pc

        # `_created` series would double every counter and histogram on the page; nothing
        # here reads them. NOTE: process-wide switch of prometheus-client.
        pc.disable_created_metrics()
        self.registry = pc.CollectorRegistry(auto_describe=True)

    def instrument(self, spec: MetricSpec) -> Instrument:
        import prometheus_client as pc

        kw = {"labelnames": spec.labels, "registry": self.registry}
        if spec.kind == "counter":
            return _PromInstrument(pc.Counter(spec.name, spec.help, **kw))
        if spec.kind == "gauge":
            return _PromInstrument(pc.Gauge(spec.name, spec.help, **kw))
        return _PromInstrument(pc.Histogram(spec.name, spec.help, buckets=spec.buckets, **kw))

    async def exposition(self) -> str:
        import prometheus_client as pc

        return pc.generate_latest(self.registry).decode()


# ---- Ray's metrics pipeline, every process of the cluster ----------------------------------


class _RayInstrument(Instrument):
    def __init__(self, metric: Any):
        self.metric = metric

    def inc(self, value: float, labels: Labels) -> None:
        self.metric.inc(value, tags=labels)

    def set(self, value: float, labels: Labels) -> None:
        self.metric.set(value, tags=labels)

    def observe(self, value: float, labels: Labels) -> None:
        self.metric.observe(value, tags=labels)


class RayBackend(Backend):
    """Records go to this node's metrics agent, which prefixes `ray_` (undone by /metrics)."""

    def __init__(self, fetch_timeout_s: float = 5.0):
        self.fetch_timeout_s = fetch_timeout_s

    def instrument(self, spec: MetricSpec) -> Instrument:
        from ray.util import metrics as rm

        if spec.kind == "counter":
            return _RayInstrument(rm.Counter(spec.name, spec.help, tag_keys=spec.labels))
        if spec.kind == "gauge":
            return _RayInstrument(rm.Gauge(spec.name, spec.help, tag_keys=spec.labels))
        return _RayInstrument(
            rm.Histogram(spec.name, spec.help, list(spec.buckets), tag_keys=spec.labels)
        )

    async def exposition(self) -> str:
        from serve_app.metrics.exposition import merge_ray_expositions

        urls = await asyncio.to_thread(agent_urls)
        pages = await asyncio.gather(*(asyncio.to_thread(self._fetch, u) for u in urls))
        # off the event loop: an agent's page is hundreds of KB of Ray's own metrics
        pages = [p for p in pages if p]
        return await asyncio.to_thread(merge_ray_expositions, pages, SERVE_PASSTHROUGH)

    def _fetch(self, url: str) -> str:
        try:
            with urllib.request.urlopen(url, timeout=self.fetch_timeout_s) as r:
                return r.read().decode()
        except OSError as e:  # a node going away: its series are missing from this scrape
            log.warning("metrics agent %s did not answer: %s", url, e)
            return ""


def agent_urls() -> list[str]:
    """The metrics endpoint of every alive node's agent (`metrics_export_port`)."""
    import ray

    return [
        f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
        for n in ray.nodes()
        if n.get("Alive") and n.get("MetricsExportPort")
    ]
