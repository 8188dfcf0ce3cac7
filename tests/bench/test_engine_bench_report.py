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


def _round(moeserve_tok: int, vllm_tok: int):
    return {
        "random": {
            "moeserve": RunResult("moeserve", "random", moeserve_tok, 1.0),
            "vllm": RunResult("vllm", "random", vllm_tok, 1.0),
        }
    }


def test_repeated_rounds_report_the_median_and_every_ratio():
    rounds = [_round(300, 250), _round(100, 200), _round(200, 100)]
    median = report.median_round(rounds)
    assert median["random"]["moeserve"].output_tokens == 200
    assert median["random"]["vllm"].output_tokens == 200
    assert report.round_ratios(rounds, "random", "vllm") == [1.2, 0.5, 2.0]
    assert report.round_ratios(rounds, "random", "transformers") == []
    table = report.format_table([_workload("random")], median, {}, rounds)
    assert "moeserve / vllm by round: 1.20x 0.50x 2.00x" in table
    data = report.report_json([_workload("random")], median, {}, {}, {}, rounds)
    assert data["workloads"]["random"]["moeserve_vs_by_round"]["vllm"] == [1.2, 0.5, 2.0]
    assert len(data["workloads"]["random"]["rounds"]) == 3


def test_even_rounds_take_the_lower_median():
    median = report.median_round([_round(300, 250), _round(100, 200)])
    assert median["random"]["moeserve"].output_tokens == 100
    assert median["random"]["vllm"].output_tokens == 200
