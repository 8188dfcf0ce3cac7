"""`moeserve bench transport`: round-trip latency of the router -> expert-shard hop over Ray.

At every MoE layer of every decode step a router sends each expert shard the tokens routed to
it and waits for all shards' outputs. This benchmark times exactly that hop, with a trivial
shard (x * 2) so that the transport dominates, over Ray's transports and the expert channel:

  actor_torch    plain actor calls, `shard.fwd.remote(...)` + `ray.get`, torch tensors
  actor_numpy    the same with numpy arrays (zero-copy deserialization from the object store)
  cgraph_torch   a Ray Compiled Graph, InputNode -> every shard -> MultiOutputNode, torch
  cgraph_numpy   the same compiled graph fed numpy arrays
  channel        the expert channel the routers use (serve_app.experts.channel), wire.py bodies

Shapes: T tokens sent to each shard, D hidden size, K experts per token (top-k).
  x [T, D] float32, topk_ids [T, K] int64, topk_weights [T, K] float32 -> out [T, D] float32

NOTE: the compiled graph's actors poll their input channels, about one core each even when idle
(measured and reported as `cgraph_idle_actor_cpu`), so the compiled graphs are timed last, after
the plain calls, and torn down before Ray shuts down.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from serve_app.bench.result import loadavg_1m

TRANSPORTS = (
    "actor_torch",
    "actor_numpy",
    "cgraph_torch",
    "cgraph_numpy",
    "channel",
)
COLORS = {
    "actor_torch": "tab:orange",
    "actor_numpy": "tab:red",
    "cgraph_torch": "tab:blue",
    "cgraph_numpy": "tab:green",
    "channel": "tab:brown",
}


@dataclass(frozen=True, slots=True)
class TransportBenchConfig:
    token_counts: tuple[int, ...] = (1, 8, 32, 128, 512)
    iters: int = 300
    warmup: int = 50
    num_shards: int = 2
    hidden: int = 512
    top_k: int = 2
    seed: int = 0
    # CPUs given to the local Ray: the shards are 0-CPU actors, so this only bounds neighbours.
    num_cpus: int = 2

    def __post_init__(self) -> None:
        for name in ("iters", "num_shards", "hidden", "top_k", "num_cpus"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if not self.token_counts or min(self.token_counts) < 1:
            raise ValueError(f"token_counts must be non-empty and >= 1, got {self.token_counts}")


class ShardPayload(NamedTuple):
    """What the router sends one shard: x [T, D], topk_ids [T, K], topk_weights [T, K]."""

    x: Any
    topk_ids: Any
    topk_weights: Any


class LatencyStats(NamedTuple):
    p50_ms: float
    p99_ms: float
    mean_ms: float
    n: int


def latency_stats(samples_s: Sequence[float]) -> LatencyStats:
    """Nearest-rank percentiles of round-trip times given in seconds, reported in ms."""
    if not samples_s:
        raise ValueError("no samples")
    s = sorted(samples_s)

    def rank(q: float) -> float:
        return s[min(len(s) - 1, max(0, int(np.ceil(q * len(s))) - 1))]

    return LatencyStats(rank(0.50) * 1e3, rank(0.99) * 1e3, sum(s) / len(s) * 1e3, len(s))


def make_payload(
    num_tokens: int, cfg: TransportBenchConfig, gen: torch.Generator, as_numpy: bool
) -> ShardPayload:
    x = torch.randn(num_tokens, cfg.hidden, generator=gen)
    ids = torch.randint(0, 64, (num_tokens, cfg.top_k), generator=gen, dtype=torch.int64)
    w = torch.rand(num_tokens, cfg.top_k, generator=gen)
    if as_numpy:
        return ShardPayload(x.numpy(), ids.numpy(), w.numpy())
    return ShardPayload(x, ids, w)


def payload_bytes(num_tokens: int, cfg: TransportBenchConfig) -> int:
    """Bytes one shard receives (x, ids, weights) per call; it sends back T * D * 4."""
    return num_tokens * (cfg.hidden * 4 + cfg.top_k * 8 + cfg.top_k * 4)


class EchoShard:
    """A stand-in expert shard: transport is what is measured, so the compute is trivial."""

    def fwd(self, x: Any, topk_ids: Any, topk_weights: Any) -> Any:
        return x * 2

    def start_channel(self) -> Any:
        """The expert channel's server (serve_app.experts.channel), as a shard actor runs it."""
        from serve_app.experts.channel import ShardServer
        from serve_app.experts.wire import decode_request, encode_response

        def echo(layer: int, body: memoryview) -> bytes:
            return encode_response(decode_request(body)[0] * 2)

        self.server = ShardServer(echo, "127.0.0.1")
        return self.server.address

    def pid(self) -> int:
        return os.getpid()


def time_round_trips(call: Callable[[], object], warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    return samples


def _check(outs: Sequence[Any], payloads: Sequence[ShardPayload], transport: str) -> None:
    for out, p in zip(outs, payloads, strict=True):
        if not np.array_equal(np.asarray(out), np.asarray(p.x) * 2):
            raise RuntimeError(f"{transport}: a shard returned a wrong result")


def _process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a local process (Linux /proc), None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _idle_cpu_fraction(pids: Sequence[int], seconds: float) -> list[float | None]:
    before = [_process_cpu_s(p) for p in pids]
    time.sleep(seconds)
    after = [_process_cpu_s(p) for p in pids]
    return [
        None if a is None or b is None else round((b - a) / seconds, 2)
        for a, b in zip(before, after, strict=True)
    ]


def measure(cfg: TransportBenchConfig, transports: Sequence[str]) -> dict[str, Any]:
    """Start a local Ray, time every transport at every T, shut Ray down; a JSON-ready dict."""
    import ray
    from ray.dag import InputNode, MultiOutputNode

    results: dict[str, dict[int, LatencyStats]] = {t: {} for t in transports}
    extra: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(cfg.seed)
    load_before = loadavg_1m()
    ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, logging_level="ERROR")
    try:
        shards = [ray.remote(num_cpus=0)(EchoShard).remote() for _ in range(cfg.num_shards)]
        pids = ray.get([s.pid.remote() for s in shards])
        extra["actor_idle_cpu"] = _idle_cpu_fraction(pids, 1.0)
        for transport in ("actor_torch", "actor_numpy"):
            if transport not in transports:
                continue
            for t in cfg.token_counts:
                payloads = [make_payload(t, cfg, gen, transport != "actor_torch") for _ in shards]

                def call(payloads: list[ShardPayload] = payloads) -> list[Any]:
                    return ray.get(
                        [s.fwd.remote(*p) for s, p in zip(shards, payloads, strict=True)]
                    )

                _check(call(), payloads, transport)
                results[transport][t] = latency_stats(time_round_trips(call, cfg.warmup, cfg.iters))
                _progress(transport, t, results[transport][t])

        if "channel" in transports:
            from serve_app.experts.channel import ShardLink
            from serve_app.experts.wire import decode_response, encode_request

            addresses = ray.get([s.start_channel.remote() for s in shards])
            links = [ShardLink(a) for a in addresses]
            for t in cfg.token_counts:
                payloads = [make_payload(t, cfg, gen, True) for _ in shards]

                def call(payloads: list[ShardPayload] = payloads) -> list[Any]:
                    # encoding is part of the hop, as in the router
                    for link, p in zip(links, payloads, strict=True):
                        link.send(0, encode_request(*p))
                    deadline = time.monotonic() + 60
                    return [decode_response(link.receive(deadline)) for link in links]

                _check(call(), payloads, "channel")
                results["channel"][t] = latency_stats(time_round_trips(call, cfg.warmup, cfg.iters))
                _progress("channel", t, results["channel"][t])
            for link in links:
                link.close()

        cg_transports = [t for t in ("cgraph_torch", "cgraph_numpy") if t in transports]
        if cg_transports:
            with InputNode() as inp:
                # NOTE: input k*3 .. k*3+2 is shard k's payload, so each shard gets its own.
                outs = [
                    s.fwd.bind(inp[3 * k], inp[3 * k + 1], inp[3 * k + 2])
                    for k, s in enumerate(shards)
                ]
                dag = MultiOutputNode(outs)
            t0 = time.perf_counter()
            compiled = dag.experimental_compile()
            extra["cgraph_compile_s"] = round(time.perf_counter() - t0, 3)
            try:
                for transport in cg_transports:
                    for t in cfg.token_counts:
                        payloads = [
                            make_payload(t, cfg, gen, transport == "cgraph_numpy") for _ in shards
                        ]
                        flat = [a for p in payloads for a in p]

                        def call(flat: list[Any] = flat) -> list[Any]:
                            return ray.get(compiled.execute(*flat))

                        _check(call(), payloads, transport)
                        results[transport][t] = latency_stats(
                            time_round_trips(call, cfg.warmup, cfg.iters)
                        )
                        _progress(transport, t, results[transport][t])
                # Measured after the timed runs: the actors' loops start only some seconds
                # after experimental_compile() returns (the first execute() waits for them).
                extra["cgraph_idle_actor_cpu"] = _idle_cpu_fraction(pids, 1.0)
            finally:
                compiled.teardown()
    finally:
        ray.shutdown()
    extra["loadavg_1m"] = (load_before, loadavg_1m())
    return {
        "config": asdict(cfg),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "ray": ray.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
        "payload_bytes_per_shard": {t: payload_bytes(t, cfg) for t in cfg.token_counts},
        "results": {tr: {t: s._asdict() for t, s in r.items()} for tr, r in results.items()},
        **extra,
    }


def format_table(report: dict[str, Any]) -> str:
    """One row per T; p50 / p99 ms per transport."""
    transports = [t for t in TRANSPORTS if report["results"].get(t)]
    head = f"{'T':>5} {'KB/shard':>9} " + " ".join(f"{t + ' p50/p99 ms':>26}" for t in transports)
    lines = [head, "-" * len(head)]
    for t, nbytes in report["payload_bytes_per_shard"].items():
        cells = []
        for tr in transports:
            s = report["results"][tr].get(t)
            cells.append(
                f"{'n/a':>26}" if s is None else f"{s['p50_ms']:>17.2f} / {s['p99_ms']:>6.2f}"
            )
        lines.append(f"{t:>5} {nbytes / 1024:>9.1f} " + " ".join(cells))
    lines.append(
        f"{report['config']['num_shards']} shards, {report['config']['iters']} round trips per "
        f"cell after {report['config']['warmup']} warm-up; load1m before/after "
        f"{report['loadavg_1m'][0]:.1f}/{report['loadavg_1m'][1]:.1f} on "
        f"{report['machine']['cpu_count']} CPUs."
    )
    if "cgraph_idle_actor_cpu" in report:
        lines.append(
            f"shard CPU use while idle (cores): plain actors {report['actor_idle_cpu']}, "
            f"in a compiled graph {report['cgraph_idle_actor_cpu']}; "
            f"compile took {report['cgraph_compile_s']} s."
        )
    return "\n".join(lines)


def write_plot(path: Path, report: dict[str, Any]) -> None:
    """p50 (solid) and p99 (dashed) round-trip latency against T, log-log."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on the bench machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for tr in TRANSPORTS:
        stats = report["results"].get(tr)
        if not stats:
            continue
        ts = sorted(stats)
        ax.plot(ts, [stats[t]["p50_ms"] for t in ts], "o-", color=COLORS[tr], label=f"{tr} p50")
        ax.plot(ts, [stats[t]["p99_ms"] for t in ts], "--", color=COLORS[tr], alpha=0.5)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens per shard (T)")
    ax.set_ylabel("round trip to all shards, ms (dashed: p99)")
    ax.set_title(
        f"router -> {report['config']['num_shards']} expert shards, Ray "
        f"{report['machine']['ray']}, {report['machine']['cpu_count']} CPUs",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_transport_bench(args: argparse.Namespace) -> int:
    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    unknown = sorted(set(transports) - set(TRANSPORTS))
    if unknown or not transports:
        print(f"unknown transports {unknown}; choose from {list(TRANSPORTS)}", file=sys.stderr)
        return 2
    try:
        cfg = TransportBenchConfig(
            token_counts=tuple(int(t) for t in args.tokens.split(",") if t.strip()),
            iters=args.iters,
            warmup=args.warmup,
            num_shards=args.shards,
        )
    except ValueError as e:
        print(f"bad arguments: {e}", file=sys.stderr)
        return 2
    report = measure(cfg, transports)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "transport.json").write_text(json.dumps(report, indent=2) + "\n")
    write_plot(out_dir / "transport.png", report)
    print(format_table(report))
    print(f"wrote {out_dir / 'transport.json'} and {out_dir / 'transport.png'}")
    return 0


def _progress(transport: str, num_tokens: int, s: LatencyStats) -> None:
    print(f"  {transport:<13} T={num_tokens:<4} p50 {s.p50_ms:.2f} ms", file=sys.stderr, flush=True)
