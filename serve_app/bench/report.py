"""The benchmark's outputs: a text table, engine_bench.json and a bar plot (engine_bench.png)."""

from __future__ import annotations

import json
from pathlib import Path

from serve_app.bench.result import RunResult
from serve_app.bench.workloads import Workload

SYSTEMS = ("moeserve", "transformers", "vllm")
BASELINES = ("transformers", "vllm")
# one colour per system, distinct also in grey print and for red-green colour blindness
COLORS = {"moeserve": "#0072B2", "transformers": "#E69F00", "vllm": "#009E73"}


def ratio(results: dict[str, RunResult], system: str, baseline: str) -> float | None:
    a, b = results.get(system), results.get(baseline)
    if a is None or b is None or b.output_tokens_per_s == 0:
        return None
    return a.output_tokens_per_s / b.output_tokens_per_s


Runs = dict[str, dict[str, RunResult]]  # workload -> system -> result (one round)


def median_round(rounds: list[Runs], systems: tuple[str, ...] | list[str] = SYSTEMS) -> Runs:
    """Per (workload, system), the round whose tok/s is the median (the lower one of an even
    count): the figure a repeated run reports."""
    out: Runs = {}
    for w in dict.fromkeys(name for runs in rounds for name in runs):
        for system in systems:
            got = sorted(
                (runs[w][system] for runs in rounds if system in runs.get(w, {})),
                key=lambda r: r.output_tokens_per_s,
            )
            if got:
                out.setdefault(w, {})[system] = got[(len(got) - 1) // 2]
    return out


def round_ratios(rounds: list[Runs], workload: str, baseline: str) -> list[float]:
    """moeserve / baseline in each round that ran both (systems of one round ran back to back)."""
    found = (ratio(runs.get(workload, {}), "moeserve", baseline) for runs in rounds)
    return [x for x in found if x is not None]


def format_table(
    workloads: list[Workload],
    by_workload: Runs,
    missing: dict[str, str],
    rounds: list[Runs] | None = None,
) -> str:
    """One row per (workload, system): output tok/s and the ratio against each baseline.

    missing maps a system that did not run to the reason, shown in place of its numbers. With
    several rounds, by_workload is their median_round and each workload gets a line with the
    ratio of every round."""
    head = (
        f"{'workload':<10} {'system':<13} {'out tok/s':>10} {'vs transformers':>16} "
        f"{'vs vllm':>8} {'wall s':>8} {'out tokens':>10} {'load1m':>6}"
    )
    lines = [head, "-" * len(head)]
    for w in workloads:
        runs = by_workload.get(w.name, {})
        for system in SYSTEMS:
            r = runs.get(system)
            if r is None:
                why = missing.get(system, "not run")
                lines.append(f"{w.name:<10} {system:<13} {'n/a':>10}   ({why})")
                continue
            cells = [_fmt_ratio(ratio(runs, system, b)) for b in BASELINES]
            lines.append(
                f"{w.name:<10} {system:<13} {r.output_tokens_per_s:>10.1f} {cells[0]:>16} "
                f"{cells[1]:>8} {r.elapsed_s:>8.1f} {r.output_tokens:>10} {max(r.loadavg):>6.1f}"
            )
        if rounds is not None and len(rounds) > 1:
            for b in BASELINES:
                xs = round_ratios(rounds, w.name, b)
                if xs:
                    lines.append(
                        f"{w.name:<10} moeserve / {b} by round: "
                        + " ".join(_fmt_ratio(x) for x in xs)
                    )
        lines.append("")
    lines.append(
        "load1m: the highest 1-minute load average around the run. The system itself adds about"
        " one per busy thread (vLLM's three processes: about 3); well above that, neighbours"
        " were competing for the CPU and the run is suspect: rerun when quiet."
    )
    return "\n".join(lines)


def report_json(
    workloads: list[Workload],
    by_workload: Runs,
    missing: dict[str, str],
    machine: dict,
    config: dict,
    rounds: list[Runs] | None = None,
) -> dict:
    out: dict = {"machine": machine, "config": config, "missing": missing, "workloads": {}}
    for w in workloads:
        runs = by_workload.get(w.name, {})
        out["workloads"][w.name] = {
            "definition": w.definition,
            "num_prompt_tokens": w.num_prompt_tokens,
            "num_output_tokens": w.num_output_tokens,
            "output_tokens_per_s": {
                s: (runs[s].output_tokens_per_s if s in runs else None) for s in SYSTEMS
            },
            "moeserve_vs": {b: ratio(runs, "moeserve", b) for b in BASELINES},
            "runs": {s: r.to_json() for s, r in runs.items()},
        }
        if rounds is not None:
            out["workloads"][w.name]["moeserve_vs_by_round"] = {
                b: round_ratios(rounds, w.name, b) for b in BASELINES
            }
            out["workloads"][w.name]["rounds"] = [
                {s: r.to_json() for s, r in one.get(w.name, {}).items()} for one in rounds
            ]
    return out


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_plot(
    path: Path, workloads: list[Workload], by_workload: dict[str, dict[str, RunResult]], title: str
) -> None:
    """Grouped bars: one group per workload, one bar (and colour) per system, 'n/a' where it did
    not run; under them a table of moeserve's ratios to each baseline and the load average."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on the bench machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 2.6 * len(workloads), 5.6))
    width = 0.8 / len(SYSTEMS)
    top = max(
        (r.output_tokens_per_s for runs in by_workload.values() for r in runs.values()),
        default=1.0,
    )
    for j, system in enumerate(SYSTEMS):
        xs, ys = [], []
        for i, w in enumerate(workloads):
            x = i + (j - (len(SYSTEMS) - 1) / 2) * width
            r = by_workload.get(w.name, {}).get(system)
            if r is None:
                ax.text(x, top * 0.02, "n/a", ha="center", va="bottom", fontsize=8, rotation=90)
                continue
            xs.append(x)
            ys.append(r.output_tokens_per_s)
        if xs:
            bars = ax.bar(xs, ys, width, color=COLORS[system])
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(workloads)), [w.name for w in workloads])
    ax.set_xlim(-0.6, len(workloads) - 0.4)
    ax.set_ylabel("output tokens / s")
    ax.set_title(title, fontsize=9)
    # NOTE: explicit handles: an empty bar call (a skipped system) would draw its legend patch
    # in the default colour, the same blue as moeserve's
    ax.legend(handles=legend_handles(by_workload))
    rows = ratio_rows(workloads, by_workload)
    table = ax.table(
        cellText=[cells for _, cells in rows],
        rowLabels=[label for label, _ in rows],
        colLabels=[w.name for w in workloads],
        loc="bottom",
        bbox=[0.0, -0.42, 1.0, 0.3],
        cellLoc="center",
    )
    table.set_fontsize(8)
    fig.subplots_adjust(left=0.22, bottom=0.36, top=0.9)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def legend_handles(by_workload: dict[str, dict[str, RunResult]]) -> list:
    """One patch per system in its own colour; '(not run)' for a system with no results."""
    from matplotlib.patches import Patch

    ran = {s for runs in by_workload.values() for s in runs}
    return [Patch(color=COLORS[s], label=s if s in ran else f"{s} (not run)") for s in SYSTEMS]


def ratio_rows(
    workloads: list[Workload], by_workload: dict[str, dict[str, RunResult]]
) -> list[tuple[str, list[str]]]:
    """Rows of the table under the plot: moeserve / each baseline, and the peak load."""
    rows = [
        (
            f"moeserve / {b}",
            [_fmt_ratio(ratio(by_workload.get(w.name, {}), "moeserve", b)) for w in workloads],
        )
        for b in BASELINES
    ]
    loads = []
    for w in workloads:
        runs = by_workload.get(w.name, {}).values()
        loads.append(f"{max(max(r.loadavg) for r in runs):.1f}" if runs else "-")
    rows.append(("load avg 1m (peak)", loads))
    return rows


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"
