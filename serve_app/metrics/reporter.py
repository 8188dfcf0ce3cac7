"""Periodic gauges and counters from an engine's stats and the machine's memory.

A router replica (or the in-process server) runs one `PeriodicReporter` thread that calls
`EngineReporter.report()` and `record_memory()` every few hundred ms; expert shard actors run
one for memory only. The engine keeps cumulative counts (EngineStats); the reporter turns them
into counter increments, so a restarted engine (counts back at zero) is a new start, not a
negative increment. NOTE: the thread only reads snapshots and /proc; it runs no torch ops
except the CUDA memory query (see serve_app.engine.async_engine on threads and OpenMP).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from serve_app.engine.stats import EngineStats
from serve_app.metrics.recorder import Metrics

log = logging.getLogger(__name__)

IMBALANCE_WINDOW_S = 60.0


def imbalance_ratio(now: Sequence[int], then: Sequence[int]) -> float | None:
    """max / mean of the per-expert tokens between two cumulative snapshots; None if idle."""
    delta = [a - b for a, b in zip(now, then, strict=True)]
    total = sum(delta)
    if not delta or total <= 0:
        return None
    return max(delta) / (total / len(delta))


_LORA_LABELS = ("running_lora_adapters", "waiting_lora_adapters", "max_lora")


class EngineReporter:
    """stats: the engine's latest EngineStats; shard_tokens: cumulative tokens per expert shard
    (empty when the experts are in-process)."""

    def __init__(
        self,
        metrics: Metrics,
        version: str,
        replica: str,
        stats: Callable[[], EngineStats],
        shard_tokens: Callable[[], Sequence[int]] = tuple,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.metrics = metrics
        self.labels = {"version": version, "replica": replica}
        self.stats, self.shard_tokens, self.clock = stats, shard_tokens, clock
        self._seen: dict[tuple, float] = {}
        self._history: deque[tuple[float, tuple[int, ...]]] = deque()

    def report(self) -> None:
        s, m, labels = self.stats(), self.metrics, self.labels
        m.set("moeserve_running_requests", s.num_running, **labels)
        m.set("moeserve_waiting_requests", s.num_waiting, **labels)
        m.set("moeserve_kv_cache_used_blocks", s.kv_blocks_used, **labels)
        m.set("moeserve_kv_cache_total_blocks", s.kv_blocks_total, **labels)
        m.set("moeserve_kv_cache_block_bytes", s.kv_block_bytes, **labels)
        m.set("moeserve_weight_bytes", s.weight_bytes, **labels)
        usage = s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0
        m.set("moeserve_kv_cache_usage_ratio", usage, **labels)
        self._count("moeserve_preemptions_total", s.num_preemptions)
        if s.lora_max:
            m.set("moeserve_lora_resident_adapters", s.lora_resident, **labels)
            m.set("moeserve_lora_resident_bytes", s.lora_resident_bytes, **labels)
            if s.lora_budget_bytes is not None:
                m.set("moeserve_lora_memory_budget_bytes", s.lora_budget_bytes, **labels)
            m.set("moeserve_lora_host_adapters", s.lora_host, **labels)
            disk = s.lora_loads - s.lora_host_loads
            self._count("moeserve_lora_loads_total", disk, source="disk")
            self._count("moeserve_lora_loads_total", s.lora_host_loads, source="host")
            self._count("moeserve_lora_evictions_total", s.lora_evictions)
            self._lora_info(s)
        for tier, queried, hit in (
            ("local", s.prefix_queried_tokens, s.prefix_hit_tokens),
            ("redis", s.prefix_remote_queried_tokens, s.prefix_remote_hit_tokens),
        ):
            self._count("moeserve_prefix_cache_queried_tokens_total", queried, tier=tier)
            self._count("moeserve_prefix_cache_hit_tokens_total", hit, tier=tier)
        for expert, n in enumerate(s.expert_tokens):
            self._count("moeserve_expert_tokens_total", n, expert=str(expert))
        for shard, n in enumerate(self.shard_tokens()):
            self._count("moeserve_expert_shard_tokens_total", n, shard=str(shard))
        ratio = self._imbalance(tuple(s.expert_tokens))
        if ratio is not None:
            m.set("moeserve_expert_imbalance_ratio", ratio, **labels)

    def _lora_info(self, s: EngineStats) -> None:
        """vLLM's `vllm:lora_requests_info` under our prefix: one series, labels the adapters
        now running and waiting, value the time (as vLLM sets it); the previous one drops to 0."""
        key = (",".join(s.lora_running), ",".join(s.lora_waiting), str(s.lora_max))
        prev = getattr(self, "_lora_key", None)
        if prev is not None and prev != key:
            self.metrics.set(
                "moeserve_lora_requests_info", 0, **dict(zip(_LORA_LABELS, prev, strict=True))
            )
        self._lora_key = key
        labels = dict(zip(_LORA_LABELS, key, strict=True))
        self.metrics.set("moeserve_lora_requests_info", time.time(), **labels)

    def _count(self, name: str, cumulative: float, **extra: str) -> None:
        key = (name, *extra.items())
        prev = self._seen.get(key, 0)
        delta = cumulative - prev if cumulative >= prev else cumulative  # engine restarted
        self._seen[key] = cumulative
        self.metrics.inc(name, delta, **self.labels, **extra)

    def _imbalance(self, counts: tuple[int, ...]) -> float | None:
        """Over the last IMBALANCE_WINDOW_S: the oldest snapshot still inside the window."""
        if not counts:
            return None
        now = self.clock()
        self._history.append((now, counts))
        while len(self._history) > 1 and self._history[1][0] <= now - IMBALANCE_WINDOW_S:
            self._history.popleft()
        then = self._history[0][1]
        if len(then) != len(counts) or then == counts:
            return None
        return imbalance_ratio(counts, then)


def host_memory() -> tuple[int, int]:
    """(used, total) bytes: MemTotal - MemAvailable from /proc/meminfo."""
    fields: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            fields[key] = int(rest.split()[0]) * 1024
    total = fields["MemTotal"]
    return total - fields.get("MemAvailable", fields.get("MemFree", 0)), total


def accelerator_memory() -> list[tuple[str, int, int]]:
    """(device, used, total) bytes for each CUDA device this process already uses."""
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return []  # NOTE: never create a CUDA context just to report
    out = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        out.append((str(i), total - free, total))
    return out


def record_memory(metrics: Metrics, node: str | None = None) -> None:
    node = node or socket.gethostname()
    used, total = host_memory()
    metrics.set("moeserve_host_memory_used_bytes", used, node=node)
    metrics.set("moeserve_host_memory_total_bytes", total, node=node)
    for device, used, total in accelerator_memory():
        metrics.set("moeserve_accelerator_memory_used_bytes", used, node=node, device=device)
        metrics.set("moeserve_accelerator_memory_total_bytes", total, node=node, device=device)


class PeriodicReporter:
    """Calls `fn` every `interval_s` on a daemon thread until stop(); errors are logged once."""

    def __init__(self, fn: Callable[[], None], interval_s: float = 0.5, name: str = "metrics"):
        self.fn, self.interval_s = fn, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"moeserve-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        warned = False
        while not self._stop.wait(self.interval_s):
            try:
                self.fn()
            except Exception:  # noqa: BLE001 - metrics must never take the replica down
                if not warned:
                    log.exception("metrics report failed (further failures not logged)")
                    warned = True

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def start_engine_reporter(
    metrics: Metrics,
    engine,
    version: str,
    replica: str,
    shard_tokens: Callable[[], Sequence[int]] = tuple,
    interval_s: float = 0.5,
) -> PeriodicReporter:
    """engine: an AsyncLLMEngine (its stats() is a snapshot refreshed by the engine thread)."""
    reporter = EngineReporter(metrics, version, replica, engine.stats, shard_tokens)

    def tick() -> None:
        reporter.report()
        record_memory(metrics)

    return PeriodicReporter(tick, interval_s, "engine-metrics")
