"""Prometheus metrics of the whole app: one catalog, one recording API, two backends.

See docs/metrics.md for the names and why Ray's metrics pipeline carries them on a cluster.
"""

from serve_app.metrics.catalog import CATALOG, MetricSpec
from serve_app.metrics.recorder import Metrics, get_metrics, use_ray_metrics

__all__ = ["CATALOG", "MetricSpec", "Metrics", "get_metrics", "use_ray_metrics"]
