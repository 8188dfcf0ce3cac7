"""Where the tests find `prometheus` and `promtool`: `make prometheus` unpacks Debian's package
into .venv/prometheus (no service, no root), and `make test` runs it first. A missing binary
fails the test, saying how to install it: a green run never left the metrics tests out."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HOW = (
    "run `make prometheus` (apt-get download prometheus && dpkg -x prometheus_*.deb "
    ".venv/prometheus), or put prometheus and promtool on PATH"
)


def prom_binary(name: str) -> str:
    """The path of `prometheus` or `promtool`; fails the test if there is none."""
    dirs = [os.environ.get("MOESERVE_PROMETHEUS_BIN", "")]
    dirs += [str(p / "prometheus" / "usr" / "bin") for p in (REPO / ".venv", Path(sys.prefix))]
    for d in dirs:
        if d and os.access(Path(d) / name, os.X_OK):
            return str(Path(d) / name)
    found = shutil.which(name)
    if found:
        return found
    pytest.fail(f"{name} not found: {HOW}")
