"""Where the tests find `prometheus` and `promtool`: `make prometheus` unpacks Debian's package
into .venv/prometheus (no service, no root). Missing binaries fail the test where apt exists
(CI must run these tests) and skip it elsewhere, saying how to install them."""

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
    """The path of `prometheus` or `promtool`; fails (apt present) or skips (no apt) if none."""
    dirs = [os.environ.get("MOESERVE_PROMETHEUS_BIN", "")]
    dirs += [str(p / "prometheus" / "usr" / "bin") for p in (REPO / ".venv", Path(sys.prefix))]
    for d in dirs:
        if d and os.access(Path(d) / name, os.X_OK):
            return str(Path(d) / name)
    found = shutil.which(name)
    if found:
        return found
    if shutil.which("apt-get"):
        pytest.fail(f"{name} not found: {HOW}")
    pytest.skip(f"{name} not found and no apt-get here: {HOW}")
