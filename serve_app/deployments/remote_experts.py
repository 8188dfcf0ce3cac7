"""The router side of expert parallelism: an ExpertExecutor whose experts live in shard actors.

submit() splits the routed tokens by shard (serve_app.experts.dispatch), sends each shard only
its slice, and returns at once; result() gathers and combines. The slices travel over the expert
channel (serve_app.experts.channel: a TCP connection per shard); Ray only resolves, pings and
recreates the shards. A shard that died is re-resolved (the Serve controller recreates it) and
its slice re-sent until call_timeout_s; after that the step fails with ExpertsUnavailableError
(HTTP 503) instead of hanging.

LoRA: when rows of the micro-batch run adapters with expert LoRA in the layer, each slice
carries its rows' adapter slots and the table of those adapters (name, path, digest); the shard
loads its experts' slices on first sight and applies them (serve_app.experts.shard_lora).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from serve_app.engine.errors import ExpertsUnavailableError
from serve_app.experts.channel import ChannelAddress, ChannelError, ShardLink, ShardRefused
from serve_app.experts.dispatch import Dispatcher, ShardSlice
from serve_app.experts.load import ExpertLoadCounter
from serve_app.experts.placement import Placement
from serve_app.experts.shard import as_tensor, to_numpy
from serve_app.experts.wire import AdapterTag, LoraRows, decode_response, encode_request
from serve_app.lora import batch as lora_batch
from serve_app.lora.batch import LoraBatch
from serve_app.model.expert_executor import ExpertExecutor, ExpertFuture

log = logging.getLogger(__name__)

# shard index -> a handle to the live actor; raises ValueError while it is being recreated
ShardResolver = Callable[[int], Any]
# (handle, timeout in s) -> where its expert channel listens
AddressOf = Callable[[Any, float], ChannelAddress]


def actor_address(handle: Any, timeout_s: float) -> ChannelAddress:
    """An ExpertShardActor's channel address, asked over Ray."""
    return ray.get(handle.channel_address.remote(), timeout=timeout_s)


class RemoteExperts(ExpertExecutor):
    def __init__(
        self,
        placement: Placement,
        resolve: ShardResolver,
        call_timeout_s: float = 60.0,
        retry_interval_s: float = 0.2,
        address_of: AddressOf = actor_address,
    ):
        """`address_of` asks a resolved shard where it listens (tests that run ExpertShards
        in this process, without Ray, pass their servers' addresses)."""
        self.dispatcher = Dispatcher(placement)
        self._address_of = address_of
        self.call_timeout_s = call_timeout_s
        self.retry_interval_s = retry_interval_s
        self._resolve = resolve
        self._handles: list[Any] = [None] * placement.num_shards
        self._links: list[ShardLink | None] = [None] * placement.num_shards
        self.num_retries = 0  # shard calls re-sent after an actor death
        self.load = ExpertLoadCounter(placement.num_experts, placement.num_shards)

    @property
    def placement(self) -> Placement:
        return self.dispatcher.placement

    def set_placement(self, placement: Placement) -> None:
        """Dispatch by a new placement from the next MoE call on (a step in flight keeps its
        slices). NOTE: every shard must already hold the experts it gives it (rebalance.py).
        """
        if (placement.num_experts, placement.num_shards) != (
            self.placement.num_experts,
            self.placement.num_shards,
        ):
            raise ValueError("a new placement must keep the number of experts and shards")
        self.dispatcher = Dispatcher(placement)

    @property
    def shard_tokens(self) -> tuple[int, ...]:
        """Token rows sent per shard so far (all layers); the metrics reporter reads it."""
        return self.load.snapshot().shard_tokens

    @property
    def is_remote(self) -> bool:
        return True

    def forward(self, layer, x, topk_ids, topk_weights) -> torch.Tensor:
        return self.submit(layer, x, topk_ids, topk_weights).result()

    def submit(self, layer, x, topk_ids, topk_weights) -> ExpertFuture:
        slices = self.dispatcher.split(x, topk_ids, topk_weights)
        self.load.record(topk_ids, slices)
        deadline = time.monotonic() + self.call_timeout_s
        adapters = _expert_adapters(lora_batch.current(), layer)
        bodies = [_encode(sl, adapters) for sl in slices]
        links = [
            self._send(layer, sl, body, deadline) for sl, body in zip(slices, bodies, strict=True)
        ]
        return _RemoteFuture(self, layer, x, slices, bodies, links, deadline)

    def _send(self, layer: int, sl: ShardSlice, body: bytes, deadline: float) -> ShardLink:
        """Start the shard's call; returns the link it went out on."""
        while True:
            link = self._link(sl.shard, deadline)
            try:
                link.send(layer, body)
                return link
            except ChannelError as e:
                self._lost(sl.shard, e, deadline)

    def _link(self, shard: int, deadline: float) -> ShardLink:
        """The open connection to the shard, connecting (after resolving it) if there is none."""
        while self._links[shard] is None:
            handle = self._handle(shard, deadline)
            try:
                left = max(0.1, deadline - time.monotonic())
                self._links[shard] = ShardLink(self._address_of(handle, left))
            except GetTimeoutError:
                raise self._silent(shard) from None
            except (RayActorError, ChannelError) as e:
                self._lost(shard, e, deadline)
        return self._links[shard]

    def _lost(self, shard: int, error: BaseException, deadline: float) -> None:
        """The shard died (or its connection did): forget it, so the next try re-resolves it
        by name; raise once the call's deadline passed."""
        log.warning("expert shard %d failed (%s); re-resolving", shard, type(error).__name__)
        self._handles[shard] = None
        self._drop_link(shard)
        self.num_retries += 1
        if time.monotonic() > deadline:
            raise ExpertsUnavailableError(f"expert shard {shard} died") from error
        time.sleep(self.retry_interval_s)

    def _handle(self, shard: int, deadline: float) -> Any:
        while self._handles[shard] is None:
            try:
                self._handles[shard] = self._resolve(shard)
            except ValueError:  # not registered yet: the controller is recreating it
                if time.monotonic() > deadline:
                    raise ExpertsUnavailableError(
                        f"expert shard {shard} is unavailable (not recreated in time)"
                    ) from None
                time.sleep(self.retry_interval_s)
        return self._handles[shard]

    async def unavailable_shards(self, timeout_s: float = 2.0) -> list[int]:
        """Shards that do not answer a ping within timeout_s: dead, being recreated, or
        waiting for a node with the resources they need. For health reports, not the step."""
        answers = await self._ask_each(lambda handle: handle.ping.remote(), timeout_s)
        return [s for s, answer in enumerate(answers) if answer is None]

    async def shard_infos(self, timeout_s: float = 2.0) -> list[dict | None]:
        """Each shard's `info()` (owned experts, weight_bytes as held, pid, device, node), or
        None where it does not answer within timeout_s: liveness and sizes in one round trip.
        For health reports, not the step."""
        return await self._ask_each(lambda handle: handle.info.remote(), timeout_s)

    async def drop_adapter(self, name: str, timeout_s: float = 5.0) -> list[bool | None]:
        """Every shard forgets LoRA adapter `name` (an admin unload): per shard, whether it
        held it, or None where it did not answer (it evicts by LRU then)."""
        return await self._ask_each(lambda handle: handle.drop_lora.remote(name), timeout_s)

    async def _ask_each(self, call: Callable[[Any], Any], timeout_s: float) -> list[Any]:
        """call(handle) on every shard at once; None for a shard that fails or is silent."""

        async def ask(shard: int) -> Any:
            try:
                handle = self._handles[shard] or self._resolve(shard)
                return await asyncio.wait_for(call(handle), timeout_s)
            except (ValueError, RayError, asyncio.TimeoutError):
                self._handles[shard] = None  # the step re-resolves it by name
                return None

        return list(await asyncio.gather(*(ask(s) for s in range(len(self._handles)))))

    def _wait(
        self, layer: int, sl: ShardSlice, body: bytes, link: ShardLink, deadline: float
    ) -> torch.Tensor:
        while True:
            try:
                body = link.receive(deadline)
            except TimeoutError:
                self._drop_link(sl.shard)  # mid-frame now: unusable
                raise self._silent(sl.shard) from None
            except ShardRefused as e:  # e.g. an expert it does not hold
                raise ExpertsUnavailableError(f"expert shard {sl.shard} failed: {e}") from e
            except ChannelError as e:
                self._lost(sl.shard, e, deadline)
                link = self._send(layer, sl, body, deadline)
                continue
            try:
                return as_tensor(decode_response(body))
            except ValueError as e:  # a malformed answer: the stream can't be trusted further
                self._drop_link(sl.shard)
                raise ExpertsUnavailableError(f"expert shard {sl.shard}: {e}") from e

    def _silent(self, shard: int) -> ExpertsUnavailableError:
        return ExpertsUnavailableError(
            f"expert shard {shard} did not answer within {self.call_timeout_s:.0f} s"
        )

    def _drop_link(self, shard: int) -> None:
        link, self._links[shard] = self._links[shard], None
        if link is not None:
            link.close()


def _expert_adapters(batch: LoraBatch | None, layer: int) -> tuple[torch.Tensor, list] | None:
    """(each row's table slot [T], the table of tags) for the adapters of `batch` with
    expert LoRA in `layer`; None when no row runs one (the base-model form goes out)."""
    if batch is None or not any(a.adapts_experts(layer) for a in batch.adapters):
        return None
    table: list[AdapterTag] = []
    remap = []  # the batch's adapter slot -> its table slot, -1: no expert LoRA here
    for a in batch.adapters:
        if a.adapts_experts(layer):
            remap.append(len(table))
            table.append(AdapterTag(a.name, a.path, a.digest))
        else:
            remap.append(-1)
    lut = torch.tensor([*remap, -1], dtype=torch.int64)  # slot -1 reads the last entry: -1
    return lut[batch.slot_of_row.cpu()], table


def _encode(sl: ShardSlice, adapters: tuple[torch.Tensor, list] | None) -> bytes:
    x, ids, w = to_numpy(sl.x), to_numpy(sl.topk_ids), to_numpy(sl.topk_weights)
    if adapters is None:
        return encode_request(x, ids, w)
    slots, table = adapters
    mine = slots[sl.token_idx.cpu()]
    if not bool((mine >= 0).any()):
        return encode_request(x, ids, w)  # none of this shard's rows runs an adapter here
    return encode_request(x, ids, w, LoraRows(mine.numpy(), tuple(table)))


class _RemoteFuture(ExpertFuture):
    __slots__ = ("executor", "layer", "like", "slices", "bodies", "links", "deadline")

    def __init__(self, executor, layer, like, slices, bodies, links, deadline):
        self.executor: RemoteExperts = executor
        self.layer, self.like, self.slices = layer, like, slices
        self.bodies, self.links, self.deadline = bodies, links, deadline

    def result(self) -> torch.Tensor:
        ex = self.executor
        try:
            parts = [
                (sl, ex._wait(self.layer, sl, body, link, self.deadline))
                for sl, body, link in zip(self.slices, self.bodies, self.links, strict=True)
            ]
        except ExpertsUnavailableError:
            # Answers to this call (and to a second micro-batch's) may still be on their way:
            # a link with an unread answer would hand it to the next call, so start afresh.
            for shard in range(len(ex._links)):
                ex._drop_link(shard)
            raise
        return Dispatcher.combine(self.like, parts)
