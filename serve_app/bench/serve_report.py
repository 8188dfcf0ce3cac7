"""`moeserve bench serve` outputs: a text table, serve_bench.json and serve_bench.png.

Ratios compare output tok/s with the baseline, the first target that ran, at the same
concurrency. Everything here is pure apart from the two writers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from serve_app.bench.cpu_usage import CpuSplit
from serve_app.bench.load import PassSummary, RequestRecord, Stats

# Acceptance lines (system, baseline, concurrency, min ratio of output tok/s): over HTTP the
# single-router app keeps >= 90% of the engine's in-process speed, and 2 expert actors keep
# most of what in-process experts give.
GOALS = (
    ("moeserve-ep0", "inproc", 32, 0.9),
    ("moeserve-ep0", "inproc", 64, 0.9),
    ("moeserve-ep2", "moeserve-ep0", 32, 0.85),
)
GOAL = GOALS[-1]


@dataclass(frozen=True, slots=True)
class PassRun:
    summary: PassSummary
    records: list[RequestRecord]
    loadavg: tuple[float, float]  # 1-minute load average before and after the pass
    cpu: CpuSplit | None = None  # the server's CPU by role over the pass (launched targets)

    @property
    def serving_ms_per_token(self) -> float | None:
        return None if self.cpu is None else self.cpu.per_token_ms(self.summary.output_tokens)


@dataclass(slots=True)
class TargetRun:
    """What one target gave. skipped says why it has no passes (not installed, no start)."""

    label: str
    source: str  # "url http://..." or "launch NAME"
    skipped: str | None = None
    model: str | None = None  # the id its /v1/models reported
    command: list[str] | None = None  # argv, for launched targets
    log: str | None = None
    passes: list[PassRun] = field(default_factory=list)

    def at(self, concurrency: int) -> PassSummary | None:
        p = self.pass_at(concurrency)
        return None if p is None else p.summary

    def pass_at(self, concurrency: int) -> PassRun | None:
        return next((p for p in self.passes if p.summary.concurrency == concurrency), None)


def baseline(runs: list[TargetRun]) -> TargetRun | None:
    return next((r for r in runs if r.passes), None)


def ratio(a: PassSummary | None, b: PassSummary | None) -> float | None:
    if a is None or b is None or b.output_tok_s == 0:
        return None
    return a.output_tok_s / b.output_tok_s


def ratios(runs: list[TargetRun], concurrencies: list[int]) -> dict[str, dict[int, float | None]]:
    base = baseline(runs)
    return {
        r.label: {c: ratio(r.at(c), base.at(c) if base else None) for c in concurrencies}
        for r in runs
    }


def goal_text(goal: tuple[str, str, int, float]) -> str:
    system, base, conc, min_ratio = goal
    return f"goal: {system} >= {min_ratio}x {base} output tok/s at concurrency {conc}"


def goal_passes(
    runs: list[TargetRun], goal: tuple[str, str, int, float]
) -> tuple[PassSummary | None, PassSummary | None]:
    """The passes a goal compares: its system's and its baseline's at its concurrency."""
    system, base, conc, _ = goal
    by_label = {r.label: r for r in runs}
    return tuple(by_label[x].at(conc) if x in by_label else None for x in (system, base))


def goal_line(runs: list[TargetRun], goal: tuple[str, str, int, float] = GOAL) -> str:
    """Whether `system` reached `min_ratio` x `base` output tok/s at `concurrency` streams."""
    system, base, conc, min_ratio = goal
    head = f"{goal_text(goal)}:"
    a, b = goal_passes(runs, goal)
    r = ratio(a, b)
    if r is None:
        missing = [n for n, s in ((system, a), (base, b)) if s is None]
        why = f"no pass of {' and '.join(missing)} at {conc}" if missing else "baseline at 0"
        return f"{head} NOT MEASURED ({why})"
    verdict = "MET" if r >= min_ratio else "NOT MET"
    failed = a.num_failed + b.num_failed
    note = f"; {failed} failed requests" if failed else ""
    return f"{head} {verdict} ({r:.2f}x: {a.output_tok_s:.1f} vs {b.output_tok_s:.1f} tok/s{note})"


def format_table(runs: list[TargetRun], concurrencies: list[int]) -> str:
    base = baseline(runs)
    vs = f"vs {base.label}" if base else "vs base"
    width = max([len(r.label) for r in runs] + [6])
    head = (
        f"{'conc':>4} {'target':<{width}} {'ok/fail':>7} {'out tok/s':>9} {vs:>{len(vs)}} "
        f"{'req/s':>6} | {'TTFT ms mean/p50/p90/p99':>25} | {'TPOT ms mean/p50/p90/p99':>25} | "
        f"{'ITL p99':>7} {'E2E ms p50/p99':>15} {'srv CPU ms/tok':>14} {'load1m':>6}"
    )
    lines = [head, "-" * len(head)]
    rs = ratios(runs, concurrencies)
    for c in concurrencies:
        for r in runs:
            p = r.pass_at(c)
            if p is None:
                why = r.skipped or "no pass"
                lines.append(f"{c:>4} {r.label:<{width}} skipped: {why}")
                continue
            s, load = p.summary, max(p.loadavg)
            lines.append(
                f"{c:>4} {r.label:<{width}} {f'{s.num_ok}/{s.num_failed}':>7} "
                f"{s.output_tok_s:>9.1f} {_fmt_ratio(rs[r.label][c]):>{len(vs)}} "
                f"{s.request_s:>6.2f} | {_fmt_stats(s.ttft_ms, '.0f'):>25} | "
                f"{_fmt_stats(s.tpot_ms, '.1f'):>25} | {_fmt(s.itl_p99_ms, '.1f'):>7} "
                f"{_fmt(s.e2e_p50_ms, '.0f') + '/' + _fmt(s.e2e_p99_ms, '.0f'):>15} "
                f"{_fmt(p.serving_ms_per_token, '.2f'):>14} {load:>6.1f}"
            )
        lines.append("")
    notes = [
        f"{r.label} at {p.summary.concurrency}: {n} requests without a usage chunk "
        "(tokens counted from chunks)"
        for r in runs
        for p in r.passes
        if (n := p.summary.usage_missing)
    ]
    notes += [
        f"{r.label} at {p.summary.concurrency}: {count}x {msg}"
        for r in runs
        for p in r.passes
        for msg, count in p.summary.errors.items()
    ]
    lines += notes
    lines += [goal_line(runs, g) for g in GOALS]
    lines.append(
        "srv CPU ms/tok: CPU of the serving path (proxy, ingress, router outside its engine"
        " thread; a one-process server outside its engine) per output token."
    )
    lines.append(
        "load1m: the highest 1-minute load average around the pass. The server adds about one"
        " per busy thread; well above the core count, neighbours were competing: rerun."
    )
    return "\n".join(lines)


def report_json(
    runs: list[TargetRun], concurrencies: list[int], config: dict, machine: dict
) -> dict:
    base = baseline(runs)
    rs = ratios(runs, concurrencies)
    return {
        "config": config,
        "machine": machine,
        "baseline": base.label if base else None,
        "goal": goal_line(runs),
        "goals": [goal_line(runs, g) for g in GOALS],
        "ratios": {label: {str(c): x for c, x in by_c.items()} for label, by_c in rs.items()},
        "targets": {
            r.label: {
                "source": r.source,
                "skipped": r.skipped,
                "model": r.model,
                "command": r.command,
                "log": r.log,
                "passes": {
                    str(p.summary.concurrency): {
                        "summary": p.summary.to_json(),
                        "loadavg": list(p.loadavg),
                        "cpu_s": p.cpu.to_json() if p.cpu else None,
                        "serving_cpu_ms_per_token": p.serving_ms_per_token,
                        "records": [x.to_json() for x in p.records],
                    }
                    for p in r.passes
                },
            }
            for r in runs
        },
    }


def write_plot(path: Path, runs: list[TargetRun], concurrencies: list[int], title: str) -> None:
    """Three panels against concurrency: output tok/s, TTFT p50 (solid) / p99 (dashed), TPOT
    p50. A target keeps its colour whether or not it ran; a skipped one is named in the legend."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on the bench machines
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, (tput, ttft, tpot) = plt.subplots(1, 3, figsize=(15, 4.6))
    colors = plt.get_cmap("tab10").colors
    for i, r in enumerate(runs):
        color = colors[i % len(colors)]
        xs = [c for c in concurrencies if r.at(c) is not None]
        ss = [r.at(c) for c in xs]
        if not xs:
            tput.plot([], [], color=color, label=f"{r.label} (skipped)")
            continue
        tput.plot(xs, [s.output_tok_s for s in ss], "o-", color=color, label=r.label)
        for style, key in (("-", "p50"), ("--", "p99")):
            ys = [getattr(s.ttft_ms, key) if s.ttft_ms else float("nan") for s in ss]
            ttft.plot(xs, ys, "o" + style, color=color)
        tpot.plot(xs, [s.tpot_ms.p50 if s.tpot_ms else float("nan") for s in ss], "o-", color=color)
    for ax, ylabel in (
        (tput, "output tokens / s (higher is better)"),
        (ttft, "TTFT ms (lower is better)"),
        (tpot, "TPOT p50 ms (lower is better)"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
        ax.minorticks_off()
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    tput.legend(fontsize=8)
    ttft.legend(
        [Line2D([], [], color="k", ls="-"), Line2D([], [], color="k", ls="--")],
        ["p50", "p99"],
        fontsize=8,
    )
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _fmt_stats(s: Stats | None, spec: str) -> str:
    return "-" if s is None else "/".join(format(v, spec) for v in s)


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"
