"""The user-facing app config (pydantic, validated at the edge): what `serve deploy` passes as
`args` to the builder, and what `moeserve` reads from a YAML file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from serve_app.engine.config import (
    DTYPES,
    QUANTIZATIONS,
    ConfigError,
    EngineConfig,
    default_of,
)
from serve_app.kvstore.settings import WRITE_POLICIES, KVStoreConfig
from serve_app.replica_settings import (  # noqa: F401 - re-exported: part of the app config
    AffinitySettings,
    AutoscalingSettings,
    ExpertSettings,
    RebalanceSettings,
    RouterSettings,
    refuse_retired,
)
from serve_app.rollout.state import AnalysisConfig, Strategy

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
    quantization: Literal[QUANTIZATIONS] = Field(  # type: ignore[valid-type]
        _engine("quantization"),
        description="Weight-only quantization at load, routers and expert shards: none, int8 "
        "(per output channel) or int4 (groups along the input). Gates, norms, embeddings and "
        "the LM head stay float. A pre-quantized checkpoint (GPTQ, AWQ, compressed-tensors) is "
        "served as it is under none; another scheme than its own is refused.",
    )
    quantization_group_size: int | None = Field(
        _engine("quantization_group_size"),
        description="int4 group size, 32, 64 or 128; None = 128 or the largest dividing K.",
    )

    @model_validator(mode="after")
    def _valid(self) -> EngineSettings:
        _checked(lambda: EngineConfig(model="", **self.model_dump()), "engine")
        return self


class PrefixCacheSettings(BaseModel):
    """The prefix cache shared by router replicas through Redis (on top of each local one).
    Defaults and bounds are KVStoreConfig's (serve_app/kvstore/settings.py)."""

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
    publish_decode: bool = Field(
        _store("publish_decode"), description="Also publish blocks of generated tokens."
    )
    write_policy: Literal[WRITE_POLICIES] = Field(  # type: ignore[valid-type]
        _store("write_policy"),
        description="write_through: publish a block when computed; write_through_selective: "
        "when this replica first reuses it.",
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

    def store_config(self, embedded_owner: str | None = None) -> KVStoreConfig | None:
        """embedded_owner: the app the embedded server belongs to (KVStoreConfig)."""
        if not self.enabled:
            return None
        url = self.redis_url or os.environ.get(REDIS_URL_ENV) or None
        return self._store_config(url, embedded_owner)

    def _store_config(self, url: str | None, embedded_owner: str | None = None) -> KVStoreConfig:
        settings = self.model_dump(exclude={"enabled", "redis_url"})
        return KVStoreConfig(url=url, embedded_owner=embedded_owner, **settings)


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
    """How a response's tokens are streamed to the client (docs/serving-path.md). They travel
    from the router over the output channel, one frame per engine step."""

    model_config = ConfigDict(extra="forbid")

    _retired = refuse_retired(
        "streaming", {"transport": "outputs always take the output channel (docs/serving-path.md)"}
    )

    stream_interval: int = Field(
        1,
        ge=1,
        le=4096,
        description="Tokens per streamed chunk (vLLM's --stream-interval): the first token and "
        "the last chunk go out at once, the rest in groups of this many. 1: every token.",
    )


class ApiSettings(BaseModel):
    """The OpenAI-compatible API's request checks (docs/structured-outputs.md)."""

    model_config = ConfigDict(extra="forbid")

    unknown_fields: Literal["reject", "ignore"] = Field(
        "reject",
        description="A request field the server does not know: `reject` answers 400 naming it "
        "(as OpenAI does); `ignore` drops it (as vLLM does), for clients that send extras of "
        "another server.",
    )


class FaultInjection(BaseModel):
    """Test-only: make this version fail or slow down, to exercise analysis and rollback."""

    model_config = ConfigDict(extra="forbid")

    error_rate: float = Field(0.0, ge=0, le=1, description="Requests refused with a 503.")
    delay_ms: float = Field(0.0, ge=0, description="Added before each request's first token.")


class LoraSettings(BaseModel):
    """LoRA adapters served on the base model (docs/lora.md): requests pick one by `model`."""

    model_config = ConfigDict(extra="forbid")

    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="Adapters loaded at start: name -> PEFT LoRA directory on every node. More "
        "are loaded at run time through POST /v1/load_lora_adapter (needs the API key).",
    )
    max_loras: int = Field(
        _engine("max_loras"), ge=1, description="Adapters held per router (LRU evicted)."
    )
    max_lora_rank: int = Field(
        _engine("max_lora_rank"), ge=1, description="Adapters of a higher rank are refused."
    )
    max_loras_per_batch: int | None = Field(
        _engine("max_loras_per_batch"),
        ge=1,
        description="Distinct adapters in one engine step (the base model does not count); a "
        "request that would exceed it waits, and no adapter waits for ever (docs/lora.md). At "
        "most max_loras; null: no cap.",
    )
    max_cpu_loras: int | None = Field(
        _engine("max_cpu_loras"),
        ge=1,
        description="Adapters kept in host memory, the resident ones included (vLLM's name and "
        "meaning): an evicted adapter among them is made resident again without reading its "
        "directory. At least max_loras; null: 2 x max_loras (docs/lora.md, Memory).",
    )
    max_lora_memory_gb: float | None = Field(
        _engine("max_lora_memory_gb"),
        ge=0,
        description="Bytes (GiB) the resident adapters may take, out of the KV pool's memory "
        "(not on top of it); the least recently used are evicted to fit. null: with adapters "
        "at start, max_loras x the largest adapter max_lora_rank allows on this model (at most "
        "half the pool), without, no budget; 0: no adapter can be served.",
    )
    pinned: list[str] = Field(
        default_factory=list,
        description="Adapters of `adapters` never evicted (at most max_loras - 1); unloading "
        "one through the admin route still works.",
    )

    @model_validator(mode="after")
    def _names(self) -> LoraSettings:
        for name in self.adapters:
            if not name or ":" in name:
                raise ValueError(f"lora.adapters: invalid adapter name {name!r}")
        n = self.max_loras_per_batch
        if n is not None and n > self.max_loras:
            raise ValueError(f"lora.max_loras_per_batch ({n}) must not exceed max_loras")
        cpu = self.max_cpu_loras
        if cpu is not None and cpu < self.max_loras:
            raise ValueError(f"lora.max_cpu_loras ({cpu}) must be at least max_loras")
        unknown = sorted(set(self.pinned) - set(self.adapters))
        if unknown:
            raise ValueError(f"lora.pinned names adapters not in lora.adapters: {unknown}")
        if len(set(self.pinned)) > self.max_loras - 1:
            raise ValueError(
                f"lora.pinned pins {len(set(self.pinned))} adapters, at most max_loras - 1 = "
                f"{self.max_loras - 1} may be"
            )
        return self


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
    api: ApiSettings = Field(default_factory=ApiSettings)
    lora: LoraSettings = Field(default_factory=LoraSettings)
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
        """The engine's config (the shared prefix cache's is kv_store_config())."""
        return EngineConfig(
            model=self.model,
            num_micro_batches=self.experts.micro_batches or (2 if self.experts.num_gpus else 1),
            num_threads=self.router.num_threads or max(1, round(self.router.num_cpus)),
            lora_adapters=tuple(self.lora.adapters.items()),
            max_loras=self.lora.max_loras,
            max_lora_rank=self.lora.max_lora_rank,
            max_loras_per_batch=self.lora.max_loras_per_batch,
            max_cpu_loras=self.lora.max_cpu_loras,
            max_lora_memory_gb=self.lora.max_lora_memory_gb,
            lora_pinned=tuple(dict.fromkeys(self.lora.pinned)),
            **self.engine.model_dump(),
        )

    def kv_store_config(self, embedded_owner: str | None = None) -> KVStoreConfig | None:
        """The shared prefix cache's connector settings (None: off); runs in the router replica,
        so the Redis URL (and its password) may come from that process's environment.
        embedded_owner: the app whose replicas on this node share one embedded redis-server
        (the Router passes its Ray node)."""
        if not self.engine.enable_prefix_caching:
            return None
        return self.prefix_cache.store_config(embedded_owner)


def config_error_line(error: ValidationError) -> str:
    """A pydantic ValidationError of an app config as one line: each setting and why."""
    parts = []
    for e in error.errors():
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        loc = ".".join(str(p) for p in e.get("loc", ()))
        # our own checks already name the setting (engine.block_size ...)
        parts.append(msg if not loc or msg.startswith(f"{loc}.") else f"{loc}: {msg}")
    return "invalid app config: " + "; ".join(parts)
