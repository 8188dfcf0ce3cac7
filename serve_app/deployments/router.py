"""The router replica: the engine (attention, gates, KV cache, scheduler) behind a Serve
deployment. Streams engine outputs to the ingress over a Serve streaming handle.

With expert_parallel_size > 0 the engine's experts are the deployment-scoped shard actors
(see serve_app.builder), reached through RemoteExperts; handles are re-resolved by name
after a shard dies, because the controller recreates it as a new actor."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator

import ray
from ray import serve

from autoscaling.signals import RouterSignals
from serve_app.config import AppConfig
from serve_app.engine.async_engine import AsyncLLMEngine
from serve_app.engine.errors import EngineError, InjectedFaultError
from serve_app.engine.request import SamplingParams
from serve_app.experts.placement import Placement, place_experts
from serve_app.experts.remote import RemoteExperts
from serve_app.metrics import use_ray_metrics
from serve_app.metrics.reporter import start_engine_reporter
from serve_app.model.config import load_model_spec

log = logging.getLogger(__name__)


def shard_actor_name(shard: int) -> str:
    return f"experts-{shard}"


class Router:
    def __init__(self, config: AppConfig):
        self.config = config
        self.experts = remote_experts(config) if config.expert_parallel_size else None
        scaling = config.router.autoscaling
        self.engine = AsyncLLMEngine.from_config(
            config.engine_config(),
            self.experts,
            ttft_window_s=scaling.ttft_window_s if scaling is not None else 60.0,
        )
        replica = serve.get_replica_context().replica_id.unique_id
        shard_tokens = (lambda: self.experts.shard_tokens) if self.experts else tuple
        self.metrics_reporter = start_engine_reporter(
            use_ray_metrics(), self.engine, config.version_name, replica, shard_tokens
        )

    async def info(self) -> dict:
        return {
            "max_model_len": self.engine.engine.max_model_len,
            "expert_parallel_size": self.config.expert_parallel_size,
            "node_id": ray.get_runtime_context().get_node_id(),  # where Ray placed this replica
            "digest": self.engine.engine.model_digest,  # the exact weights this version serves
        }

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator:
        """First item: {"accepted": True} or {"error": EngineError}; then RequestOutputs.

        Refusals travel as a value, not an exception, so the ingress can answer 4xx/503
        before it sends any byte of the response.
        """
        try:
            await self._inject_fault()
            stream = self.engine.add_request(prompt, params, request_id)
        except EngineError as e:
            yield {"error": e}
            return
        yield {"accepted": True}
        async for out in stream:
            yield out

    async def _inject_fault(self) -> None:
        fault = self.config.fault_injection
        if fault is None:
            return
        if fault.delay_ms:
            await asyncio.sleep(fault.delay_ms / 1000)
        if random.random() < fault.error_rate:
            raise InjectedFaultError(f"fault injected in version {self.config.version_name}")

    async def health(self) -> dict:
        """The engine's health; `degraded` (HTTP 503 on /health) while an expert shard does
        not answer, e.g. no node has the resources to recreate it."""
        h = self.engine.health()
        if self.experts is not None:
            h["expert_shard_retries"] = self.experts.num_retries
            down = await self.experts.unavailable_shards()
            h["experts_unavailable"] = down
            if down and h["status"] == "ok":
                h["status"] = "degraded"
        return h

    async def expert_load(self) -> dict | None:
        """Tokens this router routed to each expert and each shard since it started (summed
        over MoE layers); None with in-process experts. For rebalancing and metrics."""
        if self.experts is None:
            return None
        load = self.experts.load.snapshot()
        return {
            "placement": [list(s) for s in self.experts.placement.shards],
            "expert_tokens": list(load.expert_tokens),
            "shard_tokens": list(load.shard_tokens),
        }

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's autoscaling hook: this replica's load for autoscaling.policy (the TTFT key
        is left out while no request started within the TTFT window)."""
        return load_signals(self.engine).to_stats()

    def check_health(self) -> None:
        """Serve's replica health check: a dead engine loop makes Serve replace the replica."""
        if self.engine.dead_error is not None:
            raise RuntimeError(f"engine loop died: {self.engine.dead_error}")


def load_signals(engine: AsyncLLMEngine) -> RouterSignals:
    s = engine.stats()
    return RouterSignals(
        waiting=engine.num_queued,
        running=s.num_running,
        kv_use=s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else None,
        ttft_p90_ms=engine.ttft_quantile(0.9),
    )


def expert_placement(config: AppConfig) -> Placement:
    """Which shard owns which experts: the builder starts the shards from it, the routers
    dispatch by it (a pure function of the config, so both always agree)."""
    spec = load_model_spec(config.model)
    if not spec.is_moe:
        raise ValueError(f"expert_parallel_size > 0 needs an MoE model; {config.model} is dense")
    return place_experts(spec.num_experts, config.expert_parallel_size)


def remote_experts(config: AppConfig) -> RemoteExperts:
    return RemoteExperts(
        expert_placement(config),
        lambda shard: serve.get_deployment_actor(shard_actor_name(shard)),
        call_timeout_s=config.experts.call_timeout_s,
    )
