"""The engine benchmark's plot: a colour per system, moeserve's ratios in a table under it."""

from __future__ import annotations

from serve_app.bench import report
from serve_app.bench.result import RunResult
from serve_app.bench.workloads import Workload


def _workload(name: str) -> Workload:
    return Workload(name=name, requests=[], definition={})


def _runs():
    return {
        "random": {
            "moeserve": RunResult("moeserve", "random", 300, 1.0, (1.0, 2.5)),
            "vllm": RunResult("vllm", "random", 250, 1.0, (0.5, 3.0)),
        },
        "prefix": {"moeserve": RunResult("moeserve", "prefix", 90, 1.0, (1.0, 1.0))},
    }


def test_every_system_has_its_own_colour():
    assert set(report.COLORS) == set(report.SYSTEMS)
    assert len(set(report.COLORS.values())) == len(report.SYSTEMS)


def test_ratio_rows_under_the_plot():
    rows = dict(report.ratio_rows([_workload("random"), _workload("prefix")], _runs()))
    assert rows["moeserve / vllm"] == ["1.20x", "-"]
    assert rows["moeserve / transformers"] == ["-", "-"]
    assert rows["load avg 1m (peak)"] == ["3.0", "1.0"]


def test_plot_is_written(tmp_path):
    path = tmp_path / "engine_bench.png"
    report.write_plot(path, [_workload("random"), _workload("prefix")], _runs(), "title")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_legend_keeps_each_colour_when_a_system_did_not_run():
    handles = report.legend_handles(_runs())  # transformers did not run
    labels = {h.get_label(): h.get_facecolor() for h in handles}
    assert set(labels) == {"moeserve", "transformers (not run)", "vllm"}
    assert len({tuple(c) for c in labels.values()}) == 3
