"""The metric catalog, the docs/metrics.md table, the alert rules and the dashboard agree."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml

from serve_app.metrics.catalog import CATALOG, SERVE_PASSTHROUGH
from tests.prom import prom_binary

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "metrics.md"
DASHBOARD = REPO / "manifests" / "grafana" / "moeserve-dashboard.json"
NAME = re.compile(r"\b((?:moeserve|ray_serve)_[a-z0-9_]+)")
ROW = re.compile(r"^\| `((?:moeserve|ray_serve)_[a-z0-9_]+)` \| (\w+) \| ([^|]*) \|", re.M)


def documented() -> dict[str, tuple[str, tuple[str, ...]]]:
    return {
        name: (kind, tuple(re.findall(r"`(\w+)`", labels)))
        for name, kind, labels in ROW.findall(DOC.read_text())
    }


def metric_names(expr: str) -> set[str]:
    return {re.sub(r"_(bucket|sum|count)$", "", m) for m in NAME.findall(expr)}


def panel_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] if p["type"] != "row" for t in p["targets"]]


def test_catalog_and_docs_table_agree():
    doc = documented()
    catalog = {s.name: (s.kind, s.labels) for s in CATALOG}
    assert {n: v for n, v in doc.items() if n.startswith("moeserve_")} == catalog
    assert {n for n in doc if n.startswith("ray_serve_")} == set(SERVE_PASSTHROUGH)


def test_dashboard_uses_documented_metrics_and_shows_all_of_them():
    dash = json.loads(DASHBOARD.read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert all(p["title"] and p["targets"] for p in panels)
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    used = set().union(*(metric_names(e) for e in panel_exprs()))
    assert used <= set(documented()), sorted(used - set(documented()))
    assert set(documented()) <= used, sorted(set(documented()) - used)


def test_alert_rules_use_documented_metrics():
    groups = yaml.safe_load((REPO / "manifests" / "alerts.yaml").read_text())["groups"]
    used = set().union(*(metric_names(r["expr"]) for g in groups for r in g["rules"]))
    assert used and used <= set(documented())


def test_promtool_parses_every_dashboard_query(tmp_path):
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:q{i}", "expr": e} for i, e in enumerate(panel_exprs())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    out = subprocess.run(
        [prom_binary("promtool"), "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
