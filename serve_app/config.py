"""The user-facing app config (pydantic, validated at the edge): what `serve deploy` passes as
`args` to the builder, and what `moeserve` reads from a YAML file."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from serve_app.engine.config import EngineConfig


class EngineSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    block_size: int = Field(16, description="Tokens per KV block (power of two).")
    num_kv_blocks: int | None = Field(None, description="KV blocks per router; None = by memory.")
    kv_cache_memory_gb: float = Field(1.0, description="KV pool size on CPU, GiB per router.")
    gpu_memory_utilization: float = Field(0.9, description="Fraction of GPU memory to use.")
    max_num_seqs: int = Field(64, description="Most sequences in one batch.")
    max_num_batched_tokens: int = Field(2048, description="Token budget of one engine step.")
    max_model_len: int | None = Field(None, description="Context limit; None = the model's.")
    enable_prefix_caching: bool = Field(True, description="Automatic prefix caching.")


class RouterSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(1, ge=1, description="Router replicas (each holds a KV cache).")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per router replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per router replica.")
    max_ongoing_requests: int = Field(256, ge=1, description="Requests one router accepts.")


class AppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Checkpoint directory (config.json + safetensors).")
    served_model_name: str | None = Field(None, description="Name in /v1/models; default: dir.")
    engine: EngineSettings = Field(default_factory=EngineSettings)
    router: RouterSettings = Field(default_factory=RouterSettings)
    api_key_env: str = Field(
        "MOESERVE_API_KEY", description="Environment variable holding the API key(s)."
    )

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).resolve().name

    def engine_config(self) -> EngineConfig:
        return EngineConfig(model=self.model, **self.engine.model_dump())
