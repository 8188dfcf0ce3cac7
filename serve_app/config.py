"""The user-facing app config (pydantic, validated at the edge): what `serve deploy` passes as
`args` to the builder, and what `moeserve` reads from a YAML file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from serve_app.engine.config import (
    DTYPES,
    ConfigError,
    EngineConfig,
    KVStoreConfig,
    default_of,
)
from serve_app.experts.balancer import BalancerConfig
from serve_app.experts.rebalance import RebalanceConfig
from serve_app.rollout.state import AnalysisConfig, Strategy
from serve_app.routing.affinity import AffinityConfig

REDIS_URL_ENV = "MOESERVE_REDIS_URL"


def _engine(name: str):
    return default_of(EngineConfig, name)


def _store(name: str):
    return default_of(KVStoreConfig, name)


def _checked(build, section: str, renames: dict[str, str] | None = None) -> None:
    """Build the engine-side dataclass; its ConfigError becomes a message naming the setting
    as the user writes it (`engine.block_size must be a power of two, got 3`)."""
    try:
        build()
    except ConfigError as e:
        name = (renames or {}).get(e.field, f"{section}.{e.field}")
        raise ValueError(f"{name} {e.message}") from None


class EngineSettings(BaseModel):
    """Engine knobs; defaults and bounds are EngineConfig's (serve_app/engine/config.py)."""

    model_config = ConfigDict(extra="forbid")

    block_size: int = Field(_engine("block_size"), description="Tokens per KV block (power of 2).")
    num_kv_blocks: int | None = Field(
        _engine("num_kv_blocks"), description="KV blocks per router; None = by memory."
    )
    kv_cache_memory_gb: float = Field(
        _engine("kv_cache_memory_gb"), description="KV pool size on CPU, GiB per router."
    )
    gpu_memory_utilization: float = Field(
        _engine("gpu_memory_utilization"), description="Fraction of GPU memory to use."
    )
    max_num_seqs: int = Field(_engine("max_num_seqs"), description="Most sequences in one batch.")
    max_num_batched_tokens: int = Field(
        _engine("max_num_batched_tokens"), description="Token budget of one engine step."
    )
    max_model_len: int | None = Field(
        _engine("max_model_len"), description="Context limit; None = the model's."
    )
    enable_prefix_caching: bool = Field(
        _engine("enable_prefix_caching"), description="Automatic prefix caching."
    )
    dtype: Literal[DTYPES] = Field(  # type: ignore[valid-type]
        _engine("dtype"), description="Weights and activations; auto = bf16 on CUDA, fp32 on CPU."
    )

    @model_validator(mode="after")
    def _valid(self) -> EngineSettings:
        _checked(lambda: EngineConfig(model="", **self.model_dump()), "engine")
        return self


class PrefixCacheSettings(BaseModel):
    """The prefix cache shared by router replicas through Redis (on top of each local one).
    Defaults and bounds are KVStoreConfig's (serve_app/engine/config.py)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Share full KV blocks across replicas via Redis.")
    redis_url: str | None = Field(
        _store("url"),
        description="redis://[:password@]host:port/db or rediss:// (TLS). None: the env var "
        f"{REDIS_URL_ENV}, else an embedded redis-server started on this node.",
    )
    key_prefix: str = Field(
        _store("key_prefix"), description="Key prefix; keys add model digest, hash."
    )
    lookup_timeout_ms: float = Field(
        _store("lookup_timeout_ms"), description="Longest wait for a lookup, in (0, 10000]."
    )
    load_timeout_ms: float = Field(
        _store("load_timeout_ms"), description="Longest wait to fetch the hits, in (0, 60000]."
    )
    publish_queue_size: int = Field(
        _store("publish_queue_size"), description="Blocks queued for Redis; more drop."
    )
    int8: bool = Field(
        _store("int8"), description="Store blocks as INT8 (per layer/head scales), 1/4 size."
    )
    ttl_s: int | None = Field(
        _store("ttl_s"), description="Entry TTL, renewed on hit; None: LRU only."
    )
    embedded_maxmemory_mb: int = Field(
        _store("embedded_maxmemory_mb"),
        description="maxmemory of the embedded redis-server (allkeys-lru).",
    )

    @model_validator(mode="after")
    def _valid(self) -> PrefixCacheSettings:
        # the configured URL only: an env URL is the replicas' (checked where they read it)
        _checked(
            lambda: self._store_config(self.redis_url),
            "prefix_cache",
            {"url": "prefix_cache.redis_url"},
        )
        return self

    def store_config(self) -> KVStoreConfig | None:
        if not self.enabled:
            return None
        return self._store_config(self.redis_url or os.environ.get(REDIS_URL_ENV) or None)

    def _store_config(self, url: str | None) -> KVStoreConfig:
        return KVStoreConfig(url=url, **self.model_dump(exclude={"enabled", "redis_url"}))


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
    """Thresholds of `routing: prefix_affinity` (serve_app/routing/affinity.py; docs/routing.md)."""

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


class AnalysisSettings(BaseModel):
    """When a candidate version is healthy enough to go on (see docs/rollouts.md)."""

    model_config = ConfigDict(extra="forbid")

    interval_s: float = Field(10.0, gt=0, description="How often the analysis runs.")
    window_s: float = Field(60.0, gt=0, description="Look-back of each analysis.")
    max_error_rate: float = Field(0.01, ge=0, le=1, description="Most 5xx per request (1%).")
    max_ttft_p99_ms: float | None = Field(500.0, gt=0, description="P99 TTFT limit; None: off.")
    max_e2e_p99_ms: float | None = Field(None, gt=0, description="P99 end-to-end limit.")
    min_samples: int = Field(50, ge=1, description="Fewer requests in the window: inconclusive.")
    failure_limit: int = Field(1, ge=1, description="Failed analyses in a row before rollback.")
    max_ratio_to_stable: float | None = Field(
        None, ge=1, description="Also fail when the candidate is this many times worse."
    )
    scale_down_delay_s: float = Field(
        600.0, ge=0, description="A replaced version stays deployed at 0% this long (undo)."
    )

    def analysis_config(self) -> AnalysisConfig:
        return AnalysisConfig(**self.model_dump())


class RolloutSettings(BaseModel):
    """Defaults of `moeserve rollout start` for this version (its flags override them)."""

    model_config = ConfigDict(extra="forbid")

    strategy: Literal["canary", "bluegreen"] = Field("canary", description="How traffic moves.")
    steps: list[int] = Field([5, 25, 50, 100], description="Canary percents; the last is 100.")
    interval_s: float = Field(60.0, ge=0, description="Least time at each step.")
    auto: bool = Field(True, description="Step on passing analyses; False: wait for promote.")
    deploy_timeout_s: float = Field(
        600.0,
        gt=0,
        description="Longest wait for this version's replicas to start (model load included); "
        "replicas no node can place fail sooner, once Serve reports them pending (30 s).",
    )
    analysis: AnalysisSettings = Field(default_factory=AnalysisSettings)

    def strategy_config(self) -> Strategy:
        return Strategy(self.strategy, tuple(self.steps), self.interval_s, self.auto)

    @model_validator(mode="after")
    def _valid(self) -> RolloutSettings:
        self.strategy_config()
        self.analysis.analysis_config()
        return self


class StreamingSettings(BaseModel):
    """How a response's tokens travel from the router to the client (docs/serving-path.md)."""

    model_config = ConfigDict(extra="forbid")

    transport: Literal["channel", "serve"] = Field(
        "channel",
        description="Router -> ingress: `channel` sends each engine step's outputs for an "
        "ingress as one frame over a direct TCP connection (the request itself still goes "
        "through Serve); `serve` streams every token as its own Serve stream item.",
    )
    stream_interval: int = Field(
        1,
        ge=1,
        le=4096,
        description="Tokens per streamed chunk (vLLM's --stream-interval): the first token and "
        "the last chunk go out at once, the rest in groups of this many. 1: every token.",
    )


class FaultInjection(BaseModel):
    """Test-only: make this version fail or slow down, to exercise analysis and rollback."""

    model_config = ConfigDict(extra="forbid")

    error_rate: float = Field(0.0, ge=0, le=1, description="Requests refused with a 503.")
    delay_ms: float = Field(0.0, ge=0, description="Added before each request's first token.")


class AppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Checkpoint directory (config.json + safetensors).")
    version: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
        description="Version name for rollouts and metrics; default: the model directory name.",
    )
    served_model_name: str | None = Field(None, description="Name in /v1/models; default: dir.")
    expert_parallel_size: int = Field(
        0,
        ge=0,
        description="Expert shard actors shared by all routers; 0 keeps experts in-process.",
    )
    engine: EngineSettings = Field(default_factory=EngineSettings)
    prefix_cache: PrefixCacheSettings = Field(default_factory=PrefixCacheSettings)
    router: RouterSettings = Field(default_factory=RouterSettings)
    experts: ExpertSettings = Field(default_factory=ExpertSettings)
    api_key_env: str = Field(
        "MOESERVE_API_KEY", description="Environment variable holding the API key(s)."
    )
    rollout: RolloutSettings = Field(default_factory=RolloutSettings)
    streaming: StreamingSettings = Field(default_factory=StreamingSettings)
    fault_injection: FaultInjection | None = Field(
        None, description="Test-only faults for this version (see docs/rollouts.md)."
    )

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).resolve().name

    @property
    def version_name(self) -> str:
        return self.version or Path(self.model).resolve().name

    def engine_config(self) -> EngineConfig:
        """The engine's config; runs in the router replica, so the Redis URL (and its password)
        may come from that process's environment."""
        kv_store = self.prefix_cache.store_config() if self.engine.enable_prefix_caching else None
        return EngineConfig(
            model=self.model,
            kv_store=kv_store,
            num_micro_batches=self.experts.micro_batches or (2 if self.experts.num_gpus else 1),
            num_threads=self.router.num_threads or max(1, round(self.router.num_cpus)),
            **self.engine.model_dump(),
        )


def config_error_line(error: ValidationError) -> str:
    """A pydantic ValidationError of an app config as one line: each setting and why."""
    parts = []
    for e in error.errors():
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        loc = ".".join(str(p) for p in e.get("loc", ()))
        # our own checks already name the setting (engine.block_size ...)
        parts.append(msg if not loc or msg.startswith(f"{loc}.") else f"{loc}: {msg}")
    return "invalid app config: " + "; ".join(parts)
