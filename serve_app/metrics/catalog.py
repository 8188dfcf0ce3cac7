"""Every moeserve metric, defined once: name, type, labels, help and buckets.

Both backends (prometheus-client in one process, Ray's metrics pipeline on a cluster) build
their instruments from this list, and docs/metrics.md has one table row per entry (a unit test
holds them equal). Names are the ones Prometheus sees on `/metrics`; a node agent scraped
directly shows the same series with Ray's `ray_` prefix (docs/metrics.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["counter", "gauge", "histogram"]

# Seconds. NOTE: 0.5 must stay a boundary: the P99 > 500 ms alert compares at it.
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_LATENCY_BUCKETS_S = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0)

REQUEST = ("version", "route", "code")
GENERATION = ("version", "route")
REPLICA = ("version", "replica")


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str
    kind: Kind
    labels: tuple[str, ...]
    help: str
    buckets: tuple[float, ...] = ()


def _c(name: str, labels: tuple[str, ...], help: str) -> MetricSpec:
    return MetricSpec(name, "counter", labels, help)


def _g(name: str, labels: tuple[str, ...], help: str) -> MetricSpec:
    return MetricSpec(name, "gauge", labels, help)


def _h(name: str, labels: tuple[str, ...], help: str, buckets: tuple[float, ...]) -> MetricSpec:
    return MetricSpec(name, "histogram", labels, help, buckets)


CATALOG: tuple[MetricSpec, ...] = (
    # ---- requests (the HTTP app: ingress replicas, or the in-process server) ----
    _c("moeserve_requests_total", REQUEST, "Finished API requests by HTTP status code."),
    _h(
        "moeserve_request_duration_seconds",
        REQUEST,
        "API request wall time, arrival to last byte (streams: to the final chunk).",
        LATENCY_BUCKETS_S,
    ),
    _h(
        "moeserve_time_to_first_token_seconds",
        GENERATION,
        "Arrival of a generation request to its first generated token.",
        LATENCY_BUCKETS_S,
    ),
    _h(
        "moeserve_time_per_output_token_seconds",
        GENERATION,
        "Mean time between output tokens after the first, one observation per request.",
        TOKEN_LATENCY_BUCKETS_S,
    ),
    _c("moeserve_prompt_tokens_total", GENERATION, "Prompt tokens of generation requests."),
    _c("moeserve_generation_tokens_total", GENERATION, "Tokens generated (all choices)."),
    # ---- engine (router replicas) ----
    _g("moeserve_running_requests", REPLICA, "Sequences in the running batch."),
    _g("moeserve_waiting_requests", REPLICA, "Sequences waiting to be scheduled."),
    _g("moeserve_kv_cache_used_blocks", REPLICA, "KV-cache blocks in use."),
    _g("moeserve_kv_cache_total_blocks", REPLICA, "KV-cache blocks in the pool."),
    _g("moeserve_kv_cache_usage_ratio", REPLICA, "Fraction of KV-cache blocks in use, 0..1."),
    _g(
        "moeserve_weight_bytes",
        REPLICA,
        "Bytes of the replica's weights as held (quantized or float), in-process experts included.",
    ),
    _g(
        "moeserve_kv_cache_block_bytes",
        REPLICA,
        "Bytes of one KV-cache block, all layers (MLA latent rows or K/V).",
    ),
    _c(
        "moeserve_prefix_cache_queried_tokens_total",
        (*REPLICA, "tier"),
        "Prompt tokens looked up in the prefix cache; tier local, or redis after the local hit.",
    ),
    _c(
        "moeserve_prefix_cache_hit_tokens_total",
        (*REPLICA, "tier"),
        "Prompt tokens found in the prefix cache (tier local or redis): prefill skipped.",
    ),
    _c("moeserve_preemptions_total", REPLICA, "Sequences preempted (blocks freed, recomputed)."),
    _c(
        "moeserve_expert_tokens_total",
        (*REPLICA, "expert"),
        "Tokens routed to an expert id, summed over MoE layers (top-k slots).",
    ),
    _c(
        "moeserve_expert_shard_tokens_total",
        (*REPLICA, "shard"),
        "Tokens sent to an expert shard actor, summed over MoE layers.",
    ),
    _g(
        "moeserve_expert_imbalance_ratio",
        REPLICA,
        "Max over mean of per-expert tokens in the last minute (1 = balanced).",
    ),
    # ---- replica choice (the handles to the routers, in the ingress; routing: prefix_affinity) --
    _c(
        "moeserve_router_routed_requests_total",
        ("version", "reason"),
        "Requests sent to a router replica by reason: session, prefix_match, load_fallback, "
        "no_match.",
    ),
    # ---- memory (router replicas and expert shards) ----
    _g(
        "moeserve_accelerator_memory_used_bytes",
        ("node", "device"),
        "Accelerator memory in use on the device (all processes).",
    ),
    _g("moeserve_accelerator_memory_total_bytes", ("node", "device"), "Accelerator memory."),
    _g("moeserve_host_memory_used_bytes", ("node",), "Host memory in use (total - available)."),
    _g("moeserve_expert_shard_weight_bytes", ("shard",), "Bytes of an expert shard's weights."),
    _g("moeserve_host_memory_total_bytes", ("node",), "Host memory capacity."),
    # ---- rollouts (recorded by the rollout controller) ----
    _g(
        "moeserve_rollout_weight_ratio",
        ("app", "version"),
        "Share of new traffic routed to a model version, 0..1.",
    ),
    _g(
        "moeserve_rollout_state",
        ("app", "state"),
        "1 for the rollout's current phase, 0 for the others.",
    ),
    _g(
        "moeserve_rollout_step",
        ("app",),
        "Canary step the weights are at (1-based); 0 with no canary in progress.",
    ),
    _c(
        "moeserve_rollout_rollbacks_total",
        ("app", "reason"),
        "Rollouts rolled back; reason is a short fixed word (error_rate, latency, manual).",
    ),
)

BY_NAME: dict[str, MetricSpec] = {s.name: s for s in CATALOG}

# Ray Serve's own series that /metrics passes through unchanged (replica counts).
SERVE_PASSTHROUGH: tuple[str, ...] = (
    "ray_serve_deployment_replica_healthy",
    "ray_serve_autoscaling_target_replicas",
)
