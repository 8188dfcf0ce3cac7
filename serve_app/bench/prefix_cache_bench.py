"""`moeserve bench prefix-cache`: time to first token on replica B for a long shared prefix.

Two engines (replicas A and B) share one Redis. For each repeat, with a fresh random prefix of
--prefix-len tokens and a short suffix, B's time to first token is measured:
  cold    nothing cached anywhere (B still pays the Redis lookup that misses);
  remote  A served the prefix first, B loads its blocks from Redis and prefills the suffix;
  local   B serves the prefix again, from its own prefix cache.
The whole set runs with full-precision blocks and with INT8 blocks in Redis. B's publisher is
flushed between measurements, so background publishing never overlaps a timed request. The
machine is shared: compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from serve_app.bench.report import write_json
from serve_app.bench.result import loadavg_1m
from serve_app.engine.config import EngineConfig
from serve_app.engine.engine import LLMEngine
from serve_app.engine.outputs import EngineRequest
from serve_app.engine.request import SamplingParams
from serve_app.kvstore.settings import KVStoreConfig
from serve_app.runtime.factory import build_engine

CASES = ("cold", "remote", "local")
FIRST_TOKEN = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)


def run_prefix_cache_bench(args: argparse.Namespace) -> int:
    import torch

    if not (Path(args.model) / "config.json").exists():
        print(f"no checkpoint at {args.model}; see `moeserve make-model`", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    embedded = None
    url = args.redis_url
    if url is None:
        from serve_app.kvstore.embedded import EmbeddedRedis

        embedded = EmbeddedRedis(tempfile.mkdtemp(prefix="moeserve-bench-redis-"), 2048)
        url = embedded.url()
    runs: dict[str, dict] = {}
    load = [loadavg_1m()]
    try:
        for variant, int8 in (("fp", False), ("int8", True)):
            runs[variant] = _run_variant(args, url, int8)
            load.append(loadavg_1m())
    finally:
        if embedded is not None:
            embedded.close()

    data = {
        "config": {k: v for k, v in vars(args).items() if k != "func"},
        "torch_threads": torch.get_num_threads(),
        "loadavg_1m": load,
        "variants": runs,
    }
    print(format_table(runs))
    write_json(out_dir / "prefix_cache_bench.json", data)
    write_plot(out_dir / "prefix_cache_bench.png", runs, args)
    print(f"wrote {out_dir / 'prefix_cache_bench.json'} and {out_dir / 'prefix_cache_bench.png'}")
    return 0


def _engine(args: argparse.Namespace, url: str, int8: bool, key_prefix: str) -> LLMEngine:
    bs = 16
    per_prompt = -(-(args.prefix_len + args.suffix_len + 1) // bs)
    return build_engine(
        EngineConfig(
            model=args.model,
            block_size=bs,
            # every prompt of the run stays in the local cache: 2 prefixes per repeat + warm-up
            num_kv_blocks=per_prompt * (2 * args.repeats + 2),
            max_model_len=max(2304, args.prefix_len + args.suffix_len + 16),
            max_num_batched_tokens=max(2048, args.prefix_len + args.suffix_len),
        ),
        kv_store=KVStoreConfig(
            url=url,
            key_prefix=key_prefix,
            lookup_timeout_ms=args.lookup_timeout_ms,
            int8=int8,
        ),
    )


def _ttft(engine: LLMEngine, ids: list[int]) -> float:
    """Seconds from add_request to the first sampled token (B's publish copy included)."""
    rid = uuid.uuid4().hex
    t0 = time.perf_counter()
    engine.add_request(EngineRequest(rid, ids, FIRST_TOKEN))
    first = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if first is None and out.request_id == rid and out.new_token_ids:
                first = time.perf_counter() - t0
    if first is None:
        raise RuntimeError("no token was produced")
    return first


def _run_variant(args: argparse.Namespace, url: str, int8: bool) -> dict:
    key_prefix = f"moeserve-bench-{uuid.uuid4().hex[:8]}"  # this run's entries only
    a, b = _engine(args, url, int8, key_prefix), _engine(args, url, int8, key_prefix)
    rng = random.Random(1234 + int8)
    vocab = b.spec.vocab_size

    def tokens(n: int) -> list[int]:
        return [rng.randrange(1, vocab) for _ in range(n)]

    try:
        for e in (a, b):  # warm-up: first-call allocations, thread pools
            _ttft(e, tokens(args.prefix_len + args.suffix_len))
            e.connector.tier.flush(60)
        samples: dict[str, list[float]] = {c: [] for c in CASES}
        for _ in range(args.repeats):
            samples["cold"].append(_ttft(b, tokens(args.prefix_len) + tokens(args.suffix_len)))
            b.connector.tier.flush(60)
            prefix = tokens(args.prefix_len)
            _ttft(a, prefix + tokens(args.suffix_len))
            a.connector.tier.flush(60)
            before = b.stats()
            samples["remote"].append(_ttft(b, prefix + tokens(args.suffix_len)))
            hit = b.stats().prefix_remote_hit_tokens - before.prefix_remote_hit_tokens
            if hit < args.prefix_len - b.config.block_size:
                print(f"warning: remote hit only {hit} tokens (lookup timeout?)", file=sys.stderr)
            b.connector.tier.flush(60)
            samples["local"].append(_ttft(b, prefix + tokens(args.suffix_len)))
            b.connector.tier.flush(60)
        s = b.stats()
        ttft = {c: statistics.median(v) * 1000 for c, v in samples.items()}
        return {
            "int8": int8,
            "ttft_ms_median": ttft,
            "ttft_ms_samples": {c: [x * 1000 for x in v] for c, v in samples.items()},
            "remote_vs_cold": ttft["remote"] / ttft["cold"],
            "local_vs_cold": ttft["local"] / ttft["cold"],
            "bytes_per_block": s.kv_store.bytes_fetched / max(s.kv_store.blocks_fetched, 1),
            "remote_hit_tokens_per_request": s.prefix_remote_hit_tokens // args.repeats,
            "kv_store_b": {
                k: getattr(s.kv_store, k)
                for k in ("lookups", "lookup_timeouts", "blocks_fetched", "publish_drops")
            },
        }
    finally:
        a.close()
        b.close()


def format_table(runs: dict[str, dict]) -> str:
    head = (
        f"{'blocks':<6} {'case':<7} {'TTFT ms':>9} {'vs cold':>8} {'bytes/block':>12} "
        f"{'hit tok/req':>11} {'lookup timeouts':>15}"
    )
    lines = [head, "-" * len(head)]
    for variant, r in runs.items():
        for case in CASES:
            ms = r["ttft_ms_median"][case]
            ratio = ms / r["ttft_ms_median"]["cold"]
            lines.append(
                f"{variant:<6} {case:<7} {ms:>9.1f} {ratio:>7.3f}x "
                f"{r['bytes_per_block'] if case == 'remote' else 0:>12.0f} "
                f"{r['remote_hit_tokens_per_request'] if case == 'remote' else 0:>11} "
                f"{r['kv_store_b']['lookup_timeouts'] if case == 'remote' else 0:>15}"
            )
    lines.append(
        "TTFT: median over repeats, replica B. remote: blocks loaded from Redis (computed by A); "
        "local: B's own prefix cache. Target: remote <= 1/3 of cold."
    )
    return "\n".join(lines)


def write_plot(path: Path, runs: dict[str, dict], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    width = 0.8 / len(runs)
    colors = {"fp": "tab:blue", "int8": "tab:orange"}
    for j, (variant, r) in enumerate(runs.items()):
        xs = [i + (j - (len(runs) - 1) / 2) * width for i in range(len(CASES))]
        bars = ax.bar(
            xs,
            [r["ttft_ms_median"][c] for c in CASES],
            width,
            label=f"{variant} blocks",
            color=colors.get(variant),
        )
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(CASES)), CASES)
    ax.set_yscale("log")  # cold is 10-100x the others
    ax.set_ylabel("time to first token on replica B (ms, log scale)")
    ax.set_title(
        f"{Path(args.model).name}: {args.prefix_len}-token shared prefix + "
        f"{args.suffix_len}-token suffix",
        fontsize=9,
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
