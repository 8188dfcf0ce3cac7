"""The expert shard as a Ray actor: the thin adapter between Ray and ExpertShard.

Serve creates these as deployment-scoped actors of the router deployment (see
serve_app.builder), so every router replica shares the same N shards, and the Serve controller
recreates a shard that dies; __init__ reloads its weights from the checkpoint.
"""

from __future__ import annotations

import os

import ray
import torch

from serve_app.experts.channel import ChannelAddress, ShardServer
from serve_app.experts.shard import ExpertShard
from serve_app.metrics import use_ray_metrics
from serve_app.metrics.reporter import PeriodicReporter, record_memory
from serve_app.model.quant.precision import precision
from serve_app.model.quant.scheme import Quantization
from serve_app.platform import sched
from serve_app.platform.device import resolve_device, resolve_dtype


@ray.remote
class ExpertShardActor:
    def __init__(
        self,
        model_dir: str,
        owned: list[int],
        device: str,
        dtype: str,
        num_threads: int,
        quantization: str = "none",
        group_size: int | None = None,
        max_loras: int = 8,
    ):
        # NOTE: explicit, because Ray sets OMP_NUM_THREADS=1 for actors with num_cpus=0.
        threads = max(1, num_threads)
        torch.set_num_threads(threads)
        # a shard is engine work: the normal policy for it and the threads it starts, even when
        # Ray runs at SCHED_BATCH (serve_app.platform.sched)
        sched.set_process("normal")
        dev = resolve_device(device)
        # the routers' engine.quantization and dtype, read as they read them (bf16 on the CPU:
        # bf16 experts, float32 activations)
        prec = precision(resolve_dtype(dtype, dev), dev, Quantization(quantization, group_size))
        # max_loras: the LoRA adapters whose expert slices it keeps (the routers' lora.max_loras)
        self.shard = ExpertShard(model_dir, owned, dev, prec.compute, prec.weights, max_loras)
        metrics = use_ray_metrics()  # host and accelerator memory of this shard's node / GPU
        name = ray.get_runtime_context().get_actor_name() or f"pid-{os.getpid()}"

        def report() -> None:
            record_memory(metrics)
            metrics.set("moeserve_expert_shard_weight_bytes", self.shard.num_bytes(), shard=name)

        self.metrics_reporter = PeriodicReporter(report, 2.0, "memory")
        # The routers' layer calls (serve_app.experts.channel): Ray only creates, pings and
        # recreates this actor. The compute thread runs torch, so it sets its threads.
        self.channel = ShardServer(
            self.shard.forward_bytes,
            ray.util.get_node_ip_address(),
            on_compute_start=lambda: torch.set_num_threads(threads),
        )

    def channel_address(self) -> ChannelAddress:
        """Where routers connect for layer calls, and the token they send first."""
        return self.channel.address

    def ping(self) -> bool:
        """Liveness for the routers' health reports (queued behind forward calls)."""
        return True

    def add_experts(self, experts: list[int]) -> list[int]:
        return self.shard.add_experts(experts)

    def drop_experts(self, experts: list[int]) -> list[int]:
        return self.shard.drop_experts(experts)

    def drop_lora(self, name: str) -> bool:
        """Forget LoRA adapter `name` (unloaded through the API); True if it was held."""
        return self.shard.adapters.drop(name)

    def info(self) -> dict:
        return {
            "owned": self.shard.owned,
            "weight_bytes": self.shard.num_bytes(),
            "lora_adapters": self.shard.adapters.names(),
            "lora_bytes": self.shard.adapters.nbytes,
            "pid": os.getpid(),
            "device": str(self.shard.device),
            "node_id": ray.get_runtime_context().get_node_id(),
        }
