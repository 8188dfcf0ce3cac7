"""`bench engine --modes`: one table of every mode's tok/s and its ratios over the first mode
and over vLLM, per workload; engine_bench_modes.json and a bar plot beside it.

Ratios are taken within a round (the systems of one round ran back to back on the same
machine); with several rounds the table shows the median round's tok/s and every round's ratio.
Decode rows (`decode-bN`) are decode tok/s, from the first tokens on; the rest are end to end.
"""

from __future__ import annotations

from pathlib import Path

from serve_app.bench.modes import Mode
from serve_app.bench.report import Runs, median_round, ratio
from serve_app.bench.workloads import Workload

VLLM = "vllm"


def systems_of(modes: list[Mode]) -> list[str]:
    return [m.system for m in modes] + [VLLM]


def by_round(rounds: list[Runs], workload: str, system: str, baseline: str) -> list[float]:
    """system / baseline in each round that ran both."""
    found = (ratio(runs.get(workload, {}), system, baseline) for runs in rounds)
    return [x for x in found if x is not None]


def mode_table(
    workloads: list[Workload],
    rounds: list[Runs],
    modes: list[Mode],
    vllm_label: str,
    missing: dict[str, str],
    header: str = "",
) -> str:
    """Rows: (workload, mode) and (workload, vLLM). vllm_label says how vLLM ran (its dtype)."""
    median = median_round(rounds, systems_of(modes))
    base = modes[0]
    head = (
        f"{'workload':<11} {'mode':<16} {'out tok/s':>10} {'vs ' + base.name:>12} "
        f"{'vs vllm':>8} {'load1m':>6}"
    )
    lines = [header] if header else []
    lines += [head, "-" * len(head)]
    for w in workloads:
        runs = median.get(w.name, {})
        for m in modes:
            r = runs.get(m.system)
            if r is None:
                lines.append(f"{w.name:<11} {m.name:<16} {'n/a':>10}")
                continue
            lines.append(
                f"{w.name:<11} {m.name:<16} {r.output_tokens_per_s:>10.1f} "
                f"{_fmt(ratio(runs, m.system, base.system)):>12} "
                f"{_fmt(ratio(runs, m.system, VLLM)):>8} {max(r.loadavg):>6.1f}"
            )
        v = runs.get(VLLM)
        if v is None:
            why = missing.get(VLLM, "not run")
            lines.append(f"{w.name:<11} {vllm_label:<16} {'n/a':>10}   ({why})")
        else:
            lines.append(
                f"{w.name:<11} {vllm_label:<16} {v.output_tokens_per_s:>10.1f} "
                f"{'':>12} {'':>8} {max(v.loadavg):>6.1f}"
            )
        if len(rounds) > 1:
            for m in modes:
                parts = [
                    f"/ {b_name} " + " ".join(_fmt(x) for x in xs)
                    for b_name, b in ((base.name, base.system), (VLLM, VLLM))
                    if b != m.system and (xs := by_round(rounds, w.name, m.system, b))
                ]
                if parts:
                    lines.append(f"{w.name:<11} {m.name} by round: " + "; ".join(parts))
        lines.append("")
    lines.append(
        "decode-bN rows: decode tok/s of N sequences, timed from the step that gave each its "
        "first token (prefill excluded); other rows: output tok/s end to end."
    )
    return "\n".join(lines)


def modes_json(
    workloads: list[Workload],
    rounds: list[Runs],
    modes: list[Mode],
    vllm: dict,
    missing: dict[str, str],
    machine: dict,
    config: dict,
) -> dict:
    systems = systems_of(modes)
    median = median_round(rounds, systems)
    base = modes[0].system
    out: dict = {
        "machine": machine,
        "config": config,
        "modes": [
            {"name": m.name, "dtype": m.dtype, "quantization": m.quantization} for m in modes
        ],
        "baseline_mode": modes[0].name,
        "vllm": vllm,
        "missing": missing,
        "workloads": {},
    }
    for w in workloads:
        runs = median.get(w.name, {})
        out["workloads"][w.name] = {
            "definition": w.definition,
            "decode_only": w.decode_only,
            "output_tokens_per_s": {
                s: (runs[s].output_tokens_per_s if s in runs else None) for s in systems
            },
            "vs_baseline": {m.name: ratio(runs, m.system, base) for m in modes},
            "vs_vllm": {m.name: ratio(runs, m.system, VLLM) for m in modes},
            "vs_baseline_by_round": {
                m.name: by_round(rounds, w.name, m.system, base) for m in modes
            },
            "vs_vllm_by_round": {m.name: by_round(rounds, w.name, m.system, VLLM) for m in modes},
            "rounds": [{s: r.to_json() for s, r in one.get(w.name, {}).items()} for one in rounds],
        }
    return out


def write_modes_plot(
    path: Path,
    workloads: list[Workload],
    rounds: list[Runs],
    modes: list[Mode],
    title: str,
    vllm_label: str = VLLM,
) -> None:
    """Grouped bars: one group per workload, one bar per mode and one for vLLM (median round)."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    systems = systems_of(modes)
    median = median_round(rounds, systems)
    cmap = plt.get_cmap("tab10")
    # NOTE: at least 9 inches: the title carries the machine line
    fig, ax = plt.subplots(figsize=(max(9.0, 1.6 + 0.5 * len(systems) * len(workloads)), 5.0))
    width = 0.8 / len(systems)
    for j, system in enumerate(systems):
        xs, ys = [], []
        for i, w in enumerate(workloads):
            r = median.get(w.name, {}).get(system)
            if r is not None:
                xs.append(i + (j - (len(systems) - 1) / 2) * width)
                ys.append(r.output_tokens_per_s)
        label = vllm_label if system == VLLM else system.removeprefix("moeserve-")
        bars = ax.bar(xs, ys, width, color=cmap(j % 10), label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=6)
    ax.set_xticks(range(len(workloads)), [w.name for w in workloads])
    ax.set_ylabel("tok/s (decode-bN: decode tok/s)")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"
