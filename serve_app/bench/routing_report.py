"""`moeserve bench routing`, the pure half: the shuffled shared-prefix workload (each request
optionally running one of N LoRA adapters), per-replica prefix-cache and adapter-load counters
read from a /metrics page, and the table / JSON / plot of the modes."""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from serve_app.bench.load import PassSummary

MODES = ("pow2", "prefix_affinity")
QUERIED = "moeserve_prefix_cache_queried_tokens"
HIT = "moeserve_prefix_cache_hit_tokens"
ROUTED = "moeserve_router_routed_requests"
LORA_LOADS = "moeserve_lora_loads"
LORA_EVICTIONS = "moeserve_lora_evictions"


@dataclass(frozen=True, slots=True)
class RoutingWorkload:
    num_prefixes: int = 8
    prefix_len: int = 500
    suffix_len: int = 16
    requests_per_prefix: int = 8
    seed: int = 0
    num_adapters: int = 0  # > 0: each request runs one of them, drawn apart from its prefix

    def __post_init__(self) -> None:
        for name in ("num_prefixes", "prefix_len", "suffix_len", "requests_per_prefix"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_adapters < 0:
            raise ValueError(f"num_adapters must be >= 0, got {self.num_adapters}")


def adapter_names(w: RoutingWorkload) -> list[str]:
    return [f"ad{i}" for i in range(w.num_adapters)]


def request_adapters(w: RoutingWorkload, num_requests: int) -> list[str | None]:
    """Per request (in make_prompts' order), the adapter it runs: uniform over the adapters,
    independent of its prefix (so the prefix rarely places it: the adapter must); all None
    without adapters."""
    if not w.num_adapters:
        return [None] * num_requests
    rnd = random.Random(w.seed + 1)
    names = adapter_names(w)
    return [names[rnd.randrange(len(names))] for _ in range(num_requests)]


def make_prompts(w: RoutingWorkload, vocab_size: int) -> list[tuple[int, list[int]]]:
    """(prefix index, token ids) per request, shuffled: every request is one of the shared
    prefixes plus a suffix of its own, so only the prefix can hit a cache."""
    rnd = random.Random(w.seed)
    prefixes = [
        [rnd.randrange(vocab_size) for _ in range(w.prefix_len)] for _ in range(w.num_prefixes)
    ]
    out = [
        (p, prefixes[p] + [rnd.randrange(vocab_size) for _ in range(w.suffix_len)])
        for p in range(w.num_prefixes)
        for _ in range(w.requests_per_prefix)
    ]
    rnd.shuffle(out)
    return out


@dataclass(slots=True)
class CacheCounters:
    """Prefix-cache tokens per router replica (one model version), cumulative."""

    local_queried: dict[str, float] = field(default_factory=dict)
    local_hit: dict[str, float] = field(default_factory=dict)
    redis_hit: dict[str, float] = field(default_factory=dict)
    routed: dict[str, float] = field(default_factory=dict)  # reason -> requests
    lora_loads: dict[str, float] = field(default_factory=dict)  # replica -> adapters loaded
    lora_evictions: dict[str, float] = field(default_factory=dict)

    @property
    def total_queried(self) -> float:
        return sum(self.local_queried.values())

    def minus(self, before: CacheCounters) -> CacheCounters:
        def sub(a: dict, b: dict) -> dict:
            return {k: v - b.get(k, 0.0) for k, v in a.items()}

        return CacheCounters(
            sub(self.local_queried, before.local_queried),
            sub(self.local_hit, before.local_hit),
            sub(self.redis_hit, before.redis_hit),
            sub(self.routed, before.routed),
            sub(self.lora_loads, before.lora_loads),
            sub(self.lora_evictions, before.lora_evictions),
        )


def cache_counters(samples: Iterable, version: str) -> CacheCounters:
    """From parsed /metrics samples (prometheus_client): this version's series only, summed
    over whatever other labels the exporter adds."""
    out = CacheCounters()
    for s in samples:
        name = s.name.removesuffix("_total")
        if s.labels.get("version") != version:
            continue
        if name == ROUTED:
            key = s.labels["reason"]
            out.routed[key] = out.routed.get(key, 0.0) + s.value
            continue
        tier, replica = s.labels.get("tier"), s.labels.get("replica")
        lora = {LORA_LOADS: out.lora_loads, LORA_EVICTIONS: out.lora_evictions}.get(name)
        if lora is not None:
            lora[replica] = lora.get(replica, 0.0) + s.value
            continue
        target = {
            (QUERIED, "local"): out.local_queried,
            (HIT, "local"): out.local_hit,
            (HIT, "redis"): out.redis_hit,
        }.get((name, tier))
        if target is not None:
            target[replica] = target.get(replica, 0.0) + s.value
    return out


@dataclass(frozen=True, slots=True)
class ModeResult:
    mode: str
    summary: PassSummary
    prompt_tokens: float  # looked up in the local prefix caches, all replicas
    local_hit_share: float
    redis_hit_share: float
    load_split: dict[str, float]  # replica -> share of the prompt tokens
    routed: dict[str, float]  # reason -> requests (prefix_affinity only)
    adapter_requests: int = 0  # measured requests that ran an adapter
    adapter_loads: float = 0.0  # adapters the replicas loaded meanwhile (each one a miss)
    adapter_evictions: float = 0.0

    @property
    def adapter_resident_share(self) -> float | None:
        """Of the adapter requests, the share whose replica held the adapter already: every
        request that found it missing made its replica load it (moeserve_lora_loads_total)."""
        if not self.adapter_requests:
            return None
        return max(0.0, 1.0 - self.adapter_loads / self.adapter_requests)

    def to_json(self) -> dict:
        d = asdict(self)
        d["summary"] = self.summary.to_json()
        d["adapter_resident_share"] = self.adapter_resident_share
        return d


def mode_result(
    mode: str, summary: PassSummary, c: CacheCounters, adapter_requests: int = 0
) -> ModeResult:
    total = c.total_queried
    share = (lambda x: x / total) if total else (lambda x: 0.0)
    replicas = sorted(c.local_queried)
    return ModeResult(
        mode,
        summary,
        total,
        share(sum(c.local_hit.values())),
        share(sum(c.redis_hit.values())),
        {f"replica{i}": share(c.local_queried[r]) for i, r in enumerate(replicas)},
        {k: v for k, v in sorted(c.routed.items()) if v},
        adapter_requests,
        sum(c.lora_loads.values()),
        sum(c.lora_evictions.values()),
    )


def targets(results: dict[str, ModeResult], num_replicas: int) -> dict[str, bool | None]:
    """The issue's bar: prefix_affinity's local hit share >= 0.8, every replica >= 25% of the
    prompt tokens, no failure, TTFT p50 under pow2's; with adapters (issue 32), >= 90% of the
    adapter requests on a replica where their adapter was resident."""
    a, p = results.get("prefix_affinity"), results.get("pow2")
    if a is None:
        return {}
    ttft = None
    if p is not None and a.summary.ttft_ms and p.summary.ttft_ms:
        ttft = a.summary.ttft_ms.p50 < p.summary.ttft_ms.p50
    lora = {}
    if a.adapter_resident_share is not None:
        lora = {"adapter_resident_share>=0.9": a.adapter_resident_share >= 0.9}
    return {
        "local_hit_share>=0.8": a.local_hit_share >= 0.8,
        "every_replica>=25%": len(a.load_split) == num_replicas
        and min(a.load_split.values()) >= 0.25,
        "no_failures": all(r.summary.num_failed == 0 for r in results.values()),
        "ttft_p50_below_pow2": ttft,
        **lora,
    }


def format_table(results: dict[str, ModeResult]) -> str:
    head = (
        f"{'mode':<16} {'ok':>4} {'fail':>4} {'local hit':>9} {'redis hit':>9} "
        f"{'TTFT p50':>9} {'p90':>8} {'p99':>8} {'lora res':>8}  load split (prompt tokens)   "
        "routed"
    )
    lines = [head, "-" * len(head)]
    for r in results.values():
        t = r.summary.ttft_ms
        p50, p90, p99 = (f"{x:.0f}" for x in (t.p50, t.p90, t.p99)) if t else ("-",) * 3
        split = " ".join(f"{v:.2f}" for v in r.load_split.values())
        routed = " ".join(f"{k}={v:.0f}" for k, v in r.routed.items()) or "-"
        res = r.adapter_resident_share
        res = "-" if res is None else f"{res:.2f}"
        lines.append(
            f"{r.mode:<16} {r.summary.num_ok:>4} {r.summary.num_failed:>4} "
            f"{r.local_hit_share:>9.2f} {r.redis_hit_share:>9.2f} {p50:>9} {p90:>8} {p99:>8} "
            f"{res:>8}  "
            f"{split:<28} {routed}"
        )
    return "\n".join(lines) + (
        "\n(TTFT in ms, client side; hit shares of queried prompt tokens; lora res: share of "
        "adapter requests whose replica held the adapter)"
    )


def write_plot(path: Path, results: dict[str, ModeResult], title: str) -> None:
    """Three panels: hit shares, TTFT percentiles, load split; one bar group per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(results)
    lora = any(r.adapter_resident_share is not None for r in results.values())
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    panels = [
        (
            "share (of prompt tokens; lora: of adapter requests)",
            ("local hit", "redis hit") + (("lora resident",) if lora else ()),
            lambda r: (
                [r.local_hit_share, r.redis_hit_share]
                + ([r.adapter_resident_share or 0.0] if lora else [])
            ),
        ),
        ("TTFT ms", ("p50", "p90", "p99"), _ttfts),
        (
            "share of prompt tokens",
            tuple(_replicas(results)),
            lambda r: list(r.load_split.values()),
        ),
    ]
    for ax, (ylabel, names, values) in zip(axes, panels, strict=True):
        width = 0.8 / max(1, len(modes))
        for j, mode in enumerate(modes):
            ys = values(results[mode])
            xs = [i + (j - (len(modes) - 1) / 2) * width for i in range(len(ys))]
            bars = ax.bar(xs, ys, width, label=mode)
            ax.bar_label(bars, fmt="%.2f" if ylabel.startswith("share") else "%.0f", fontsize=7)
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel(ylabel)
    axes[0].legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ttfts(r: ModeResult) -> list[float]:
    t = r.summary.ttft_ms
    return [t.p50, t.p90, t.p99] if t else [0.0, 0.0, 0.0]


def _replicas(results: dict[str, ModeResult]) -> list[str]:
    return list(dict.fromkeys(k for r in results.values() for k in r.load_split))
