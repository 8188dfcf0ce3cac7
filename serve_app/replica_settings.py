"""The replica settings of the app config (pydantic, validated at the edge): router replicas
(count or autoscaling, request routing, resources) and expert shards (resources, rebalancing).
AppConfig (serve_app.config) holds them; this module knows nothing of the engine."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from serve_app.experts.balancer import BalancerConfig
from serve_app.experts.rebalance import RebalanceConfig
from serve_app.replica_picking.affinity import AffinityConfig


def refuse_retired(section: str, retired: dict[str, str]):
    """A settings model's check that a retired key is a one-line error saying what replaced it
    (not pydantic's "extra inputs are not permitted", nor silently ignored)."""

    def check(cls, data: object) -> object:
        if isinstance(data, dict):
            for key, instead in retired.items():
                if key in data:
                    raise ValueError(f"{section}.{key} was retired: {instead}; remove the key")
        return data

    return model_validator(mode="before")(classmethod(check))


class AutoscalingSettings(BaseModel):
    """Router replicas sized by the LLM-signal policy (autoscaling/policy.py; num_replicas is
    then ignored). Defaults and the reasons for them: docs/autoscaling.md."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(
        1, ge=0, description="Fewest router replicas; 0 = scale to zero when idle."
    )
    max_replicas: int = Field(4, ge=1, description="Most router replicas.")
    target_running_per_replica: float = Field(
        32.0, gt=0, description="Running sequences one replica should carry (sizes a scale-up)."
    )
    max_waiting_per_replica: float = Field(
        2.0, ge=0, description="Queued requests per replica above which the policy scales up."
    )
    kv_high: float = Field(
        0.9, gt=0, le=1, description="KV-cache use of the fullest replica that is pressure."
    )
    ttft_slo_ms: float = Field(
        1000.0, gt=0, description="P90 TTFT objective; the replicas' mean above it scales up."
    )
    upscale_step: int = Field(1, ge=1, description="Replicas added on an SLO or KV breach.")
    upscale_cooldown_s: float = Field(
        30.0, ge=0, description="No further scale-up this long after one (new replicas start)."
    )
    downscale_delay_s: float = Field(
        300.0, ge=0, description="Low load must last this long before each one-replica step down."
    )
    downscale_band: float = Field(
        0.6, gt=0, lt=1, description="Low load: one replica fewer stays under band x the limits."
    )
    ttft_window_s: float = Field(
        60.0, gt=0, description="Each replica reports the P90 TTFT of requests this recent."
    )
    look_back_period_s: float = Field(
        30.0, gt=0, description="Serve averages each replica's signals over this window."
    )
    metrics_interval_s: float = Field(
        10.0, gt=0, description="How often replicas push their signals to the Serve controller."
    )

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSettings:
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be >= min_replicas")
        return self

    def policy_kwargs(self) -> dict[str, float | int]:
        """The knobs of autoscaling.policy.PolicyConfig (its bounds come from the deployment)."""
        return self.model_dump(
            exclude={
                "min_replicas",
                "max_replicas",
                "ttft_window_s",
                "look_back_period_s",
                "metrics_interval_s",
            }
        )


def _check_resources(resources: dict[str, float]) -> dict[str, float]:
    for name, amount in resources.items():
        if name in ("CPU", "GPU"):
            raise ValueError(f"use num_cpus / num_gpus, not resources.{name}")
        if amount < 0:
            raise ValueError(f"resources.{name} must be >= 0, got {amount}")
    return resources


# Custom Ray resources (beyond CPU/GPU) that pin actors to node types, e.g. {"router": 1}.
PlacementResources = Annotated[dict[str, float], AfterValidator(_check_resources)]


class AffinitySettings(BaseModel):
    """Thresholds of `routing: prefix_affinity` (replica_picking/affinity.py; docs/routing.md)."""

    model_config = ConfigDict(extra="forbid")

    load_factor: float = Field(
        1.5,
        ge=1,
        description="Load bound: a replica takes one more request while its in-flight requests "
        "+ 1 <= ceil(load_factor x (all in flight + 1) / replicas); past it, the least-loaded "
        "replica is used.",
    )
    min_load: int = Field(
        4,
        ge=0,
        description="A replica with fewer requests in flight than this is never past the load "
        "bound (a few requests batch together; moving one costs its whole prefill).",
    )
    max_kv_use: float = Field(
        0.9,
        gt=0,
        le=1,
        description="A replica whose KV-cache use is above this is past the bound too (unless "
        "every replica is).",
    )
    min_match_blocks: int = Field(
        1, ge=1, description="Shortest tracked prefix (in KV blocks) that counts as a match."
    )
    max_key_blocks: int = Field(
        256, ge=1, description="Leading prompt blocks hashed for routing (longer prefixes tie)."
    )
    max_tracked_blocks: int = Field(
        65_536, ge=1, description="Block hashes each ingress remembers (LRU), all replicas."
    )
    session_ttl_s: float = Field(
        600.0, gt=0, description="A session (user / x-session-id) silent this long is re-placed."
    )
    stats_period_s: float = Field(
        2.0, gt=0, description="How often each router replica reports its KV-cache use."
    )

    def affinity_config(self) -> AffinityConfig:
        return AffinityConfig(
            **self.model_dump(exclude={"max_key_blocks", "stats_period_s"}),
        )


class RouterSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(1, ge=1, description="Router replicas (each holds a KV cache).")
    autoscaling: AutoscalingSettings | None = Field(
        None, description="Scale router replicas with load instead of a fixed num_replicas."
    )
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per router replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per router replica.")
    num_threads: int | None = Field(
        None, ge=1, description="Torch threads per router; default: num_cpus rounded, at least 1."
    )
    max_ongoing_requests: int = Field(256, ge=1, description="Requests one router accepts.")
    resources: PlacementResources = Field(
        default_factory=dict,
        description="Custom Ray resources per router replica, e.g. {router: 1} to land on "
        "router nodes.",
    )
    graceful_shutdown_timeout_s: float = Field(
        120.0,
        ge=0,
        description="How long a stopping router (scale-down, redeploy) lets its streams finish.",
    )
    routing: Literal["pow2", "prefix_affinity"] = Field(
        "pow2",
        description="How a request picks a router replica: pow2 (Serve's power of two choices "
        "on queue length) or prefix_affinity (the replica that holds its longest prompt "
        "prefix, within a load bound; docs/routing.md).",
    )
    affinity: AffinitySettings = Field(default_factory=AffinitySettings)


class RebalanceSettings(BaseModel):
    """Replicate hot experts across the shards while the app runs (serve_app/experts/balancer.py;
    docs/autoscaling.md, "Expert shards")."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Run the expert balancer (expert_parallel_size > 0).")
    interval_s: float = Field(5.0, gt=0, description="How often the balancer decides and acts.")
    window_s: float = Field(
        60.0, gt=0, description="Load window; a shard must be hot over a full window."
    )
    imbalance_threshold: float = Field(
        1.5, ge=1, description="Act when the hottest shard's load exceeds this x the mean."
    )
    min_gain: float = Field(
        0.1, ge=0, lt=1, description="Only move when the imbalance drops by this fraction."
    )
    min_tokens: int = Field(10_000, ge=0, description="Ignore windows with less routed traffic.")
    spare_slots_per_shard: int = Field(
        1, ge=0, description="Experts a shard may hold beyond one copy of each (the replicas)."
    )
    sync_interval_s: float = Field(
        1.0, gt=0, description="How often each router reports its load and pulls the placement."
    )
    router_timeout_s: float = Field(
        10.0, gt=0, description="A router silent this long is no longer awaited before a drop."
    )

    def balancer_config(self) -> BalancerConfig:
        fields = self.model_dump(exclude={"enabled"})
        rebalance = RebalanceConfig(
            **{k: fields.pop(k) for k in list(fields) if k in RebalanceConfig.__slots__}
        )
        return BalancerConfig(rebalance, **fields)

    @model_validator(mode="after")
    def _valid(self) -> RebalanceSettings:
        self.balancer_config()
        return self


class ExpertSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    _retired = refuse_retired(
        "experts", {"transport": "layer calls always take the expert channel (docs/transport.md)"}
    )

    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per expert shard actor.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per expert shard actor.")
    num_threads: int | None = Field(
        None, ge=1, description="Torch threads per shard; default: num_cpus rounded, at least 1."
    )
    micro_batches: int | None = Field(
        None,
        ge=1,
        le=2,
        description="Micro-batches per step; 2 = attention/expert ping-pong. None: 2 when the "
        "shards have GPUs of their own, else 1 (on shared CPU cores overlap adds no compute).",
    )
    call_timeout_s: float = Field(
        60.0, gt=0, description="Longest wait for a shard, retries after its death included."
    )
    resources: PlacementResources = Field(
        default_factory=dict,
        description="Custom Ray resources per shard actor, e.g. {expert: 1} to land on "
        "expert nodes.",
    )
    rebalance: RebalanceSettings = Field(default_factory=RebalanceSettings)
