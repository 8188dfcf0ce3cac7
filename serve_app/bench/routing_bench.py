"""`moeserve bench routing`: pow2 vs prefix_affinity across router replicas on a local Ray.

Each mode gets a fresh application (its own router replicas, so cold local caches, and its own
Redis key prefix, so a cold shared tier) on one local Ray + Serve started here; the same
shuffled shared-prefix requests go to each at a fixed concurrency. The prefix-cache counters
come from the app's own /metrics (per replica and tier), the replica-choice reasons from the
ingress's moeserve_router_routed_requests_total, TTFT from the streaming client.

With --adapters N (issue 32), N random LoRA adapters are written for the model and served by
every mode's app (lora.max_loras per replica); each request runs one of them, drawn apart from
its prefix. Each adapter is sent once before the measured pass (one at a time: the adapters
are placed), and the measured adapter requests are compared with the adapter loads the
replicas made meanwhile (moeserve_lora_loads_total): each load is a request whose replica did
not hold its adapter.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from serve_app.bench.load import Endpoint, run_pass, summarize
from serve_app.bench.result import loadavg_1m
from serve_app.bench.routing_report import (
    MODES,
    CacheCounters,
    ModeResult,
    RoutingWorkload,
    adapter_names,
    cache_counters,
    format_table,
    make_prompts,
    mode_result,
    request_adapters,
    targets,
    write_plot,
)


@dataclass(frozen=True, slots=True)
class RoutingBenchConfig:
    model: str
    workload: RoutingWorkload
    modes: tuple[str, ...] = MODES
    num_replicas: int = 2
    concurrency: int = 4
    output_len: int = 8
    router_cpus: float = 1.0
    router_threads: int = 1
    write_policy: str | None = None  # the shared tier's; None: the app config's default
    ready_timeout_s: float = 600.0
    counters_timeout_s: float = 120.0
    adapter_dirs: tuple[tuple[str, str], ...] = ()  # name -> PEFT directory (workload's adapters)
    max_loras: int = 8  # adapters each router replica holds

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"modes must be among {MODES}, got {self.modes}")
        if self.num_replicas < 1 or self.concurrency < 1 or self.output_len < 1:
            raise ValueError("num_replicas, concurrency and output_len must be >= 1")
        if [n for n, _ in self.adapter_dirs] != adapter_names(self.workload):
            raise ValueError("adapter_dirs must name the workload's adapters, in order")
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")


def app_args(cfg: RoutingBenchConfig, mode: str, run_id: str) -> dict:
    lora = {"lora": {"adapters": dict(cfg.adapter_dirs), "max_loras": cfg.max_loras}}
    return {
        **(lora if cfg.adapter_dirs else {}),
        "model": cfg.model,
        "version": f"bench-{mode.replace('_', '-')}",
        "served_model_name": "bench",
        "router": {
            "num_replicas": cfg.num_replicas,
            "num_cpus": cfg.router_cpus,
            "num_threads": cfg.router_threads,
            "routing": mode,
        },
        # A cold shared tier per mode: the modes must not share each other's blocks.
        "prefix_cache": {
            "key_prefix": f"moeserve:bench-routing:{run_id}:{mode}",
            **({"write_policy": cfg.write_policy} if cfg.write_policy else {}),
        },
    }


def run_mode(cfg: RoutingBenchConfig, mode: str, base_url: str, run_id: str) -> ModeResult:
    from ray import serve

    from serve_app.builder import build_app

    args = app_args(cfg, mode, run_id)
    name, prefix = f"routing-{mode}", f"/{mode}"
    serve.run(build_app(args), name=name, route_prefix=prefix, blocking=False)
    url = base_url + prefix
    try:
        _wait(
            lambda: httpx.get(f"{url}/health", timeout=10).status_code == 200, cfg.ready_timeout_s
        )
        endpoint = Endpoint(url, "bench")
        version = args["version"]
        tok = _tokenizer(cfg.model)
        # Warm-up: one prompt shorter than a block per replica slot (no prefix to share).
        warm = [[1 + i, 2, 3] for i in range(2 * cfg.num_replicas)]
        asyncio.run(run_pass(endpoint, warm, 2, cfg.num_replicas))
        # Each adapter once, one at a time: placed (the replicas loaded it at start, or now).
        names = adapter_names(cfg.workload)
        warm_lora = [[7 + i, 2, 3] for i in range(len(names))]
        asyncio.run(run_pass(endpoint, warm_lora, 2, 1, names))
        before = _settled(url, version, 3 * (len(warm) + len(names)), cfg.counters_timeout_s)
        prompts = [ids for _, ids in make_prompts(cfg.workload, len(tok))]
        models = request_adapters(cfg.workload, len(prompts))
        passed = run_pass(endpoint, prompts, cfg.output_len, cfg.concurrency, models)
        result = asyncio.run(passed)
        expected = before.total_queried + sum(len(p) for p in prompts)
        after = _settled(url, version, expected, cfg.counters_timeout_s)
        summary = summarize(result.records, result.duration_s, cfg.concurrency)
        n_lora = sum(1 for m, r in zip(models, result.records, strict=True) if m and r.ok)
        if n_lora and not after.lora_loads:
            # every replica loads its configured adapters at start: no series means the count
            # was not read, and 0 loads would read as a perfect residency
            raise RuntimeError(f"no moeserve_lora_loads_total of {version} on /metrics")
        return mode_result(mode, summary, after.minus(before), n_lora)
    finally:
        serve.delete(name)


def _settled(url: str, version: str, min_queried: float, timeout_s: float) -> CacheCounters:
    """The counters once every replica reported at least min_queried prompt tokens in all
    and two scrapes a few seconds apart agree (Ray ships metrics every second here)."""
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        text = httpx.get(f"{url}/metrics", timeout=30).text
        samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]
        c = cache_counters(samples, version)
        if last is not None and c == last and c.total_queried >= min_queried:
            return c
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"prefix-cache counters of {version} did not settle at >= {min_queried} tokens "
                f"(last: {c.total_queried})"
            )
        last = c
        time.sleep(3.0)


def _wait(check, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise TimeoutError("the app did not become healthy")


def _tokenizer(model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_routing_bench(args: argparse.Namespace) -> int:
    out = Path(args.out)
    model = str(Path(args.model).resolve())
    workload = RoutingWorkload(
        args.prefixes,
        args.prefix_len,
        args.suffix_len,
        args.requests_per_prefix,
        args.seed,
        args.adapters,
    )
    adapter_dirs = {}
    if workload.num_adapters:
        from serve_app.bench.lora_adapters import write_random_adapters

        names = adapter_names(workload)
        adapter_dirs = write_random_adapters(model, out / "adapters", names, seed=args.seed)
    cfg = RoutingBenchConfig(
        model=model,
        workload=workload,
        modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()),
        num_replicas=args.replicas,
        concurrency=args.concurrency,
        output_len=args.output_len,
        router_cpus=args.router_cpus,
        write_policy=args.prefix_write_policy,
        adapter_dirs=tuple(adapter_dirs.items()),
        max_loras=args.max_loras,
    )
    out.mkdir(parents=True, exist_ok=True)
    # Metrics reach /metrics a second after they are recorded (default 10 s). Before ray.init.
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
    import ray
    from ray import serve

    from serve_app.procs import free_port

    port = free_port()
    cpus = max(4, int(cfg.num_replicas * cfg.router_cpus) + 1)
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    run_id = uuid.uuid4().hex[:8]
    loads = [loadavg_1m()]
    results: dict[str, ModeResult] = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for mode in cfg.modes:
            print(f"[routing] {mode}: {cfg.num_replicas} router replicas ...", file=sys.stderr)
            results[mode] = run_mode(cfg, mode, f"http://127.0.0.1:{port}", run_id)
            loads.append(loadavg_1m())
    finally:
        serve.shutdown()
        ray.shutdown()
    machine = (
        f"{_cpu_model()}, {os.cpu_count()} cores, loadavg 1m {min(loads):.2f}-{max(loads):.2f}"
    )
    w = cfg.workload
    title = (
        f"bench routing: {cfg.num_replicas} routers, {w.num_prefixes} prefixes x "
        f"{w.requests_per_prefix} req, {w.prefix_len}+{w.suffix_len} tokens, c={cfg.concurrency}, "
        f"{Path(cfg.model).name}"
        + (f", {w.num_adapters} adapters (max_loras {cfg.max_loras})" if w.num_adapters else "")
        + f"\n{machine}"
    )
    print(title)
    print(format_table(results))
    verdict = targets(results, cfg.num_replicas)
    print("targets:", ", ".join(f"{k}={v}" for k, v in verdict.items()))
    data = {
        "config": {
            "model": cfg.model,
            "modes": list(cfg.modes),
            "num_replicas": cfg.num_replicas,
            "concurrency": cfg.concurrency,
            "output_len": cfg.output_len,
            "workload": {
                "num_prefixes": w.num_prefixes,
                "prefix_len": w.prefix_len,
                "suffix_len": w.suffix_len,
                "requests_per_prefix": w.requests_per_prefix,
                "seed": w.seed,
                "num_adapters": w.num_adapters,
            },
            "max_loras": cfg.max_loras,
        },
        "machine": machine,
        "results": {m: r.to_json() for m, r in results.items()},
        "targets": verdict,
    }
    (out / "routing.json").write_text(json.dumps(data, indent=2) + "\n")
    write_plot(out / "routing.png", results, title)
    print(f"wrote {out / 'routing.json'} and {out / 'routing.png'}")
    return 0
