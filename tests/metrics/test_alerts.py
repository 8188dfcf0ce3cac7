"""manifests/alerts.yaml: well-formed rules, metrics in the docs/metrics.md contract, promtool."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from tests.prom import prom_binary

REPO = Path(__file__).resolve().parents[2]
ALERTS = REPO / "manifests" / "alerts.yaml"
ALERTS_TEST = REPO / "manifests" / "alerts_test.yaml"
METRICS_DOC = REPO / "docs" / "metrics.md"
DURATION = re.compile(r"^\d+[smhd]$")


def _rules() -> list[dict]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_every_rule_has_expr_for_severity_and_summary():
    rules = _rules()
    assert [r["alert"] for r in rules] == [
        "MoeserveP99LatencyHigh",
        "MoeserveErrorRateHigh",
        "MoeserveKVCacheFull",
        "MoeserveAcceleratorMemoryHigh",
        "MoeserveHostMemoryHigh",
        "MoeserveExpertImbalance",
        "MoeserveRolloutRolledBack",
    ]
    for r in rules:
        assert r["expr"].strip(), r["alert"]
        assert DURATION.match(str(r["for"])), r["alert"]
        assert r["labels"]["severity"] in {"critical", "warning", "info"}, r["alert"]
        assert r["annotations"]["summary"].strip(), r["alert"]


def test_alert_metrics_are_in_the_metrics_contract():
    used = {
        re.sub(r"_(bucket|sum|count)$", "", m)
        for r in _rules()
        for m in re.findall(r"\bmoeserve_[a-z0-9_]+", r["expr"])
    }
    documented = set(re.findall(r"^\| `(moeserve_[a-z0-9_]+)`", METRICS_DOC.read_text(), re.M))
    assert used <= documented, sorted(used - documented)


def test_promtool_checks_and_unit_tests_pass():
    promtool = prom_binary("promtool")
    for args in (["check", "rules", str(ALERTS)], ["test", "rules", str(ALERTS_TEST)]):
        out = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
