"""The router replica: the engine (attention, gates, KV cache, scheduler) behind a Serve
deployment. Token-in/token-out: a request's sequences come as token ids through a Serve handle
(`generate_to`); their token outputs go to the ingress over the output channel
(serve_app.deployments.output_channel), one frame per step. The ingress makes the text.

With expert_parallel_size > 0 the engine's experts are the deployment-scoped shard actors
(see serve_app.builder), reached through RemoteExperts; handles are re-resolved by name
after a shard dies, because the controller recreates it as a new actor."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from typing import Any

import ray
from ray import serve

from autoscaling.signals import RouterSignals
from serve_app.config import AppConfig
from serve_app.deployments.adapter_unloads import UnloadSync, shares_unloads
from serve_app.deployments.output_channel import OutputOutbox, ReplyTo
from serve_app.deployments.remote_experts import RemoteExperts
from serve_app.deployments.replica_picker import KV_USE_STAT
from serve_app.engine.async_engine import AsyncLLMEngine
from serve_app.engine.errors import EngineError
from serve_app.engine.outputs import EngineRequest, LoraRef
from serve_app.experts.balancer import Versioned
from serve_app.experts.placement import Placement, place_experts
from serve_app.lora.peft_format import LoraError
from serve_app.lora.unloads import Unload
from serve_app.messages import PlacementReport, Refused, RouterInfo
from serve_app.metrics import use_ray_metrics
from serve_app.metrics.reporter import start_engine_reporter
from serve_app.model.config import ModelSpec, load_model_spec
from serve_app.replica_picking.affinity import RouteRequest
from serve_app.rollout.faults import InjectedFaultError
from serve_app.runtime.factory import build_async_engine

log = logging.getLogger(__name__)


BALANCER_ACTOR_NAME = "expert-balancer"


def ray_node_owner(context) -> str:
    """The embedded redis-server's owner for the replicas on this node of this Ray cluster."""
    return f"ray-{context.get_node_id()}"


def shard_actor_name(shard: int) -> str:
    return f"experts-{shard}"


class Router:
    def __init__(self, config: AppConfig):
        self.config = config
        spec = load_model_spec(config.model)  # once for this process, passed down
        self.experts = remote_experts(config, spec) if config.expert_parallel_size else None
        self.replica = replica = serve.get_replica_context().replica_id.unique_id
        self.placement_sync: PlacementSync | None = None
        if self.experts is not None and config.experts.rebalance.enabled:
            # Before serving: a router started after a rebalance dispatches by its placement.
            self.placement_sync = PlacementSync(
                self.experts, replica, config.experts.rebalance.sync_interval_s
            )
        scaling = config.router.autoscaling
        self.engine = build_async_engine(
            # one embedded redis-server per app and node: a node id is unique to its Ray
            # cluster, so a second app on this machine (its own Ray) gets its own
            config.engine_config(),
            self.experts,
            ttft_window_s=scaling.ttft_window_s if scaling is not None else 60.0,
            kv_store=config.kv_store_config(ray_node_owner(ray.get_runtime_context())),
            spec=spec,
        )
        shard_tokens = (lambda: self.experts.shard_tokens) if self.experts else tuple
        self.metrics_reporter = start_engine_reporter(
            use_ray_metrics(), self.engine, config.version_name, replica, shard_tokens
        )
        self.outbox: OutputOutbox | None = None  # made on the replica's event loop
        lora = self.engine.engine.lora
        self.unloads = (
            UnloadSync(lambda u: lora.unload(u.name, up_to=u.revision))
            if shares_unloads(config)
            else None
        )

    async def info(self) -> RouterInfo:
        engine = self.engine.engine
        return RouterInfo(
            max_model_len=engine.max_model_len,
            expert_parallel_size=self.config.expert_parallel_size,
            node_id=ray.get_runtime_context().get_node_id(),
            digest=engine.model_digest,
            routing=self.config.router.routing,
            block_size=engine.config.block_size,
            prefix_hash_seed=engine.config.prefix_hash_seed,
            route_key_blocks=self.config.router.affinity.max_key_blocks,
        )

    async def load_adapter(self, ref: LoraRef) -> str | None:
        """Load (or reload) a LoRA adapter now; the reason it cannot be served, or None."""
        lora = self.engine.engine.lora
        try:  # off the replica's event loop: it reads the adapter's files
            await asyncio.to_thread(lora.load, ref.name, ref.path, ref.revision, ref.pinned)
        except LoraError as e:
            return str(e)
        return None

    async def unload_adapter(self, unload: Unload) -> bool:
        """Drop a LoRA adapter (an admin unload; a newer revision of the name stays): here now,
        on the expert shards now, on the other router replicas at their next unload sync
        (deployments/adapter_unloads.py). Whether this replica held it."""
        held = self.engine.engine.lora.unload(unload.name, up_to=unload.revision)
        if self.experts is not None:
            await self.experts.drop_adapter(unload.name)
        if self.unloads is not None:
            await asyncio.to_thread(self.unloads.unload, unload)
        return held

    async def generate_to(
        self,
        requests: list[EngineRequest],
        reply: ReplyTo,
        stream: int,
        route: RouteRequest | None = None,
    ) -> Refused | None:
        """Run a request's sequences (token ids in: the ingress's front end tokenized the
        prompt and fanned n > 1 out) whose token outputs go over the output channel to `reply`
        (the ingress's inbox) as stream number `stream`, batched with the other requests of
        each engine step; returns when every sequence finished or the ingress aborted it. A
        refusal is returned (Refused) before anything is sent; cancelling the call aborts the
        sequences and frees their KV blocks. `route` is read by the handle's request router
        before the call arrives here (serve_app.deployments.replica_picker); unused here."""
        ids = [r.request_id for r in requests]
        try:
            await self._inject_fault()
            await self.engine.before_add(requests[0])
            if self.outbox is None:
                self.outbox = OutputOutbox()
            sink = self.outbox.sink(reply, stream, ids, self.engine.abort)
        except EngineError as e:
            return Refused(e)
        try:
            self.engine.add_request_to(requests, sink)
        except EngineError as e:
            sink.close()
            return Refused(e)
        try:
            await asyncio.shield(sink.done)
        finally:
            if not sink.finished:
                sink.close()  # drops whatever the engine still hands it
                for rid in ids:
                    self.engine.abort(rid)
        return None

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
        not answer, e.g. no node has the resources to recreate it. With expert shards,
        `weights.shard_bytes` lists each shard's weight bytes as held (None: no answer);
        `weights.bytes` is this replica's own (everything but the routed experts). `replica`:
        which router replica answered (Serve's replica id)."""
        h = self.engine.health()
        h["replica"] = self.replica
        if self.experts is not None:
            h["expert_shard_retries"] = self.experts.num_retries
            # one info() per shard: liveness and the bytes each holds (which rebalancing moves)
            infos = await self.experts.shard_infos()
            down = [s for s, info in enumerate(infos) if info is None]
            h["experts_unavailable"] = down
            if "weights" in h:
                h["weights"]["shard_bytes"] = [
                    None if info is None else info["weight_bytes"] for info in infos
                ]
            if down and h["status"] == "ok":
                h["status"] = "degraded"
        return h

    async def expert_load(self) -> dict | None:
        """Tokens this router routed to each expert and each shard since it started (summed
        over MoE layers); None with in-process experts. For rebalancing and metrics."""
        if self.experts is None:
            return None
        load = self.experts.load.snapshot()
        sync = self.placement_sync
        return {
            "generation": sync.generation if sync is not None else 0,
            "placement": [list(s) for s in self.experts.placement.shards],
            "expert_tokens": list(load.expert_tokens),
            "shard_tokens": list(load.shard_tokens),
        }

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's autoscaling hook: this replica's load for autoscaling.policy (the TTFT key
        is left out while no request started within the TTFT window)."""
        return load_signals(self.engine).to_stats()

    async def record_routing_stats(self) -> dict[str, float]:
        """Serve's request-routing hook: what PrefixAffinityReplicaPicker reads per replica."""
        s = self.engine.stats()
        kv_use = s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0
        return {KV_USE_STAT: kv_use}

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


def expert_placement(config: AppConfig, spec: ModelSpec | None = None) -> Placement:
    """Which shard owns which experts: the builder starts the shards from it, the routers
    dispatch by it (a pure function of the config, so both always agree). spec: the model's,
    if the caller has it (None: read from the checkpoint)."""
    spec = spec or load_model_spec(config.model)
    if not spec.is_moe:
        raise ValueError(f"expert_parallel_size > 0 needs an MoE model; {config.model} is dense")
    return place_experts(spec.num_experts, config.expert_parallel_size)


def remote_experts(config: AppConfig, spec: ModelSpec) -> RemoteExperts:
    return RemoteExperts(
        expert_placement(config, spec),
        lambda shard: serve.get_deployment_actor(shard_actor_name(shard)),
        call_timeout_s=config.experts.call_timeout_s,
    )


class PlacementSync:
    """A router's link to the expert balancer (serve_app.deployments.balancer_actor): takes the
    current placement before the router serves, then a daemon thread reports this router's
    cumulative expert tokens and placement generation every interval_s and switches the
    dispatcher when the balancer publishes a newer one (between two MoE calls)."""

    def __init__(self, experts: RemoteExperts, replica: str, interval_s: float):
        self.experts, self.replica, self.interval_s = experts, replica, interval_s
        self.balancer = serve.get_deployment_actor(BALANCER_ACTOR_NAME)
        self.generation = 0
        self._apply(ray.get(self.balancer.register.remote(replica), timeout=60))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moeserve-placement", daemon=True)
        self._thread.start()

    def _apply(self, current: Versioned) -> None:
        if current.generation != self.generation or current.placement != self.experts.placement:
            self.experts.set_placement(current.placement)
            log.info("router %s: expert placement generation %d", self.replica, current.generation)
        self.generation = current.generation

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sync()
            except Exception as e:  # noqa: BLE001 - e.g. the balancer is being recreated
                log.warning("placement sync failed (%s); retrying", type(e).__name__)
                try:
                    self.balancer = serve.get_deployment_actor(BALANCER_ACTOR_NAME)
                except ValueError:
                    pass

    def sync(self) -> None:
        placement = self.experts.placement
        report = PlacementReport(
            self.replica,
            tuple(self.experts.load.snapshot().expert_tokens),
            Versioned(self.generation, placement),
            tuple(_resolve_or_none(s) for s in range(placement.num_shards)),
        )
        ref = self.balancer.sync.remote(report)
        self._apply(ray.get(ref, timeout=max(10.0, 5 * self.interval_s)))

    def stop(self) -> None:
        self._stop.set()


def _resolve_or_none(shard: int) -> Any:
    try:
        return serve.get_deployment_actor(shard_actor_name(shard))
    except ValueError:  # being recreated
        return None
