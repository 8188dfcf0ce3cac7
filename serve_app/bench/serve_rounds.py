"""`moeserve bench serve --repeat N`: each ratio goal over N rounds of the same targets.

On a small shared VM one round's ratio moves by ±5-8% from the next (docs/benchmarks.md: the
same code gave ep0 / in-process 0.80-0.93x over twelve rounds), so one round cannot say whether
a goal is met. Rounds run every target in turn (A B A B ...), so a drift of the machine hits
both sides of a ratio alike; this module summarises the ratios they gave. Pure apart from the
two writers.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from serve_app.bench.serve_report import GOALS, TargetRun, goal_passes, goal_text, ratio


@dataclass(frozen=True, slots=True)
class GoalRounds:
    system: str
    base: str
    concurrency: int
    min_ratio: float
    ratios: tuple[float | None, ...]  # one per round; None where either side had no pass

    @property
    def measured(self) -> list[float]:
        return [r for r in self.ratios if r is not None]

    @property
    def median(self) -> float | None:
        return statistics.median(self.measured) if self.measured else None

    @property
    def met(self) -> int:
        return sum(r >= self.min_ratio for r in self.measured)

    def line(self) -> str:
        goal = (self.system, self.base, self.concurrency, self.min_ratio)
        head = f"{goal_text(goal)}, over {len(self.ratios)} rounds:"
        got = self.measured
        if not got:
            return f"{head} NOT MEASURED"
        verdict = "MET" if self.median >= self.min_ratio else "NOT MET"
        each = ", ".join("-" if r is None else f"{r:.2f}" for r in self.ratios)
        return (
            f"{head} {verdict} by the median ({self.median:.2f}x; {min(got):.2f}-{max(got):.2f}x,"
            f" met in {self.met} of {len(got)} rounds: {each})"
        )

    def to_json(self) -> dict:
        return asdict(self) | {"median": self.median, "met_rounds": self.met}


def goal_rounds(rounds: list[list[TargetRun]], goals=GOALS) -> list[GoalRounds]:
    return [
        GoalRounds(*goal, tuple(ratio(*goal_passes(runs, goal)) for runs in rounds))
        for goal in goals
    ]


def tok_s_rounds(rounds: list[list[TargetRun]], levels: list[int]) -> dict[str, dict[str, list]]:
    """Output tok/s of every target at every level, one entry per round (None: no pass)."""
    labels = list(dict.fromkeys(r.label for runs in rounds for r in runs))
    out: dict[str, dict[str, list]] = {}
    for label in labels:
        out[label] = {}
        for c in levels:
            row = []
            for runs in rounds:
                s = next((r.at(c) for r in runs if r.label == label), None)
                row.append(None if s is None else s.output_tok_s)
            out[label][str(c)] = row
    return out


def rounds_json(
    rounds: list[list[TargetRun]], levels: list[int], config: dict, machine: dict
) -> dict:
    return {
        "config": config,
        "machine": machine,
        "rounds": len(rounds),
        "round_dirs": [f"round-{k + 1}" for k in range(len(rounds))],
        "goals": [g.to_json() for g in goal_rounds(rounds)],
        "output_tok_s": tok_s_rounds(rounds, levels),
    }


def write_rounds_plot(path: Path, goals: list[GoalRounds], title: str) -> None:
    """Each goal's ratio by round, with its threshold and median."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on the bench machines
    import matplotlib.pyplot as plt

    shown = [g for g in goals if g.measured]
    fig, axes = plt.subplots(1, max(len(shown), 1), figsize=(5 * max(len(shown), 1), 4))
    axes = axes if len(shown) > 1 else [axes]
    for ax, g in zip(axes, shown, strict=False):
        xs = [k + 1 for k, r in enumerate(g.ratios) if r is not None]
        ax.plot(xs, g.measured, "o-", label="each round")
        ax.axhline(g.min_ratio, color="r", ls="--", label=f"goal {g.min_ratio}x")
        ax.axhline(g.median, color="k", ls=":", label=f"median {g.median:.2f}x")
        ax.set_title(f"{g.system} / {g.base} at {g.concurrency} streams", fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylabel("output tok/s ratio")
        ax.set_xticks(xs)
        ax.set_ylim(0, max([*g.measured, g.min_ratio]) * 1.15)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
