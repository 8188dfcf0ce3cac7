"""`moeserve bench lora`'s report: each round's pair and ratio, the goals, a table, JSON, PNG.

Each workload is a pair of runs on the same prompts: `mixed` is base-only (baseline) vs
adapters mixed (candidate), compared by output tok/s; `zipf` is one adapter (baseline) vs Zipf
traffic over many (candidate), compared by P99 TTFT. The goals are issue 32's.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class _Run(Protocol):
    output_tokens: int
    elapsed_s: float
    ttft_s: list[float] | None
    errors: int

    @property
    def tok_per_s(self) -> float: ...


# workload -> (baseline label, candidate label, metric, goal: "min" ratio or "max" ratio)
GOALS = {
    "mixed": ("base", "mixed", "output tok/s", ">=", 0.8),
    "zipf": ("single", "zipf", "P99 TTFT", "<=", 2.0),
}


def p99(values: list[float] | None) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, -(-99 * len(ordered) // 100) - 1))]


@dataclass(slots=True)
class PairResult:
    workload: str
    baseline: _Run
    candidate: _Run
    lora: dict[str, int]  # adapter loads and evictions during the pair

    def metric(self, run: _Run) -> float:
        return run.tok_per_s if self.workload == "mixed" else p99(run.ttft_s)

    @property
    def ratio(self) -> float | None:
        base = self.metric(self.baseline)
        return self.metric(self.candidate) / base if base > 0 else None

    @property
    def met(self) -> bool:
        _, _, _, op, goal = GOALS[self.workload]
        r = self.ratio
        return r is not None and (r >= goal if op == ">=" else r <= goal) and not self.errors

    @property
    def errors(self) -> int:
        return self.baseline.errors + self.candidate.errors

    def line(self) -> str:
        b, c, metric, _, _ = GOALS[self.workload]
        unit = "tok/s" if self.workload == "mixed" else "ms"
        scale = 1.0 if self.workload == "mixed" else 1000.0
        return (
            f"{metric} {b} {self.metric(self.baseline) * scale:.1f} {unit}, {c} "
            f"{self.metric(self.candidate) * scale:.1f} {unit}, ratio {_fmt(self.ratio)}, "
            f"errors {self.errors}, loads {self.lora.get('lora_loads', 0)}, evictions "
            f"{self.lora.get('lora_evictions', 0)}"
        )

    def to_json(self) -> dict:
        def side(run: _Run) -> dict:
            return {
                "output_tokens": run.output_tokens,
                "elapsed_s": run.elapsed_s,
                "output_tokens_per_s": run.tok_per_s,
                "p50_ttft_s": statistics.median(run.ttft_s) if run.ttft_s else 0.0,
                "p99_ttft_s": p99(run.ttft_s),
                "errors": run.errors,
            }

        b, c, _, _, _ = GOALS[self.workload]
        return {
            b: side(self.baseline),
            c: side(self.candidate),
            "ratio": self.ratio,
            "errors": self.errors,
            "met": self.met,
            **self.lora,
        }


def summary(rounds: list[PairResult]) -> dict:
    ratios = [r.ratio for r in rounds if r.ratio is not None]
    _, _, metric, op, goal = GOALS[rounds[0].workload]
    return {
        "metric": f"{metric} ratio",
        "goal": f"{op} {goal}",
        "median_ratio": statistics.median(ratios) if ratios else None,
        "ratios": [r.ratio for r in rounds],
        "rounds_met": sum(r.met for r in rounds),
        "rounds": len(rounds),
        "errors": sum(r.errors for r in rounds),
    }


def format_table(rounds: dict[str, list[PairResult]]) -> str:
    lines = [f"{'workload':<8} {'round':>5}  result", "-" * 100]
    for w, pairs in rounds.items():
        for i, p in enumerate(pairs):
            lines.append(f"{w:<8} {i + 1:>5}  {p.line()}")
        s = summary(pairs)
        lines.append(
            f"{w:<8} {'all':>5}  {s['metric']}: median {_fmt(s['median_ratio'])} (goal "
            f"{s['goal']}), met in {s['rounds_met']}/{s['rounds']} rounds, {s['errors']} errors"
        )
    return "\n".join(lines)


def report_json(
    rounds: dict[str, list[PairResult]], machine: dict, config: dict, model: str
) -> dict:
    return {
        "model": model,
        "config": config,
        "machine": machine,
        "workloads": {
            w: {"summary": summary(pairs), "rounds": [p.to_json() for p in pairs]}
            for w, pairs in rounds.items()
        },
    }


def write_plot(path: Path, rounds: dict[str, list[PairResult]], title: str) -> None:
    """One panel per workload: baseline and candidate per round, the goal ratio in the title."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rounds), figsize=(5.5 * len(rounds), 4.8), squeeze=False)
    for ax, (w, pairs) in zip(axes[0], rounds.items(), strict=True):
        b, c, metric, op, goal = GOALS[w]
        scale = 1.0 if w == "mixed" else 1000.0
        xs = range(len(pairs))
        for j, (label, pick) in enumerate(((b, "baseline"), (c, "candidate"))):
            ys = [p.metric(getattr(p, pick)) * scale for p in pairs]
            bars = ax.bar([x + (j - 0.5) * 0.38 for x in xs], ys, 0.38, label=label)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(list(xs), [f"round {i + 1}\n{_fmt(p.ratio)}" for i, p in enumerate(pairs)])
        ax.set_ylabel(metric if w == "mixed" else f"{metric} (ms)")
        ax.set_title(f"{w}: {c} / {b} {op} {goal}x", fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"
