"""scripts/apt-install.sh decides what is missing by dpkg's status, not by whether dpkg knows
the package: a package removed but not purged ("deinstall ok config-files") is installed
again. Run with stand-ins for dpkg-query, apt-get and id on PATH (as root, so no sudo)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "apt-install.sh"
PKG = "moeserve-test-pkg"  # a name no real binary on this machine has


def fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)


def run(tmp_path: Path, status: str | None, binary: bool) -> list[str]:
    """The apt-get calls the script made."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "apt-get.calls"
    query = f"printf '%s' '{status}'" if status is not None else "exit 1"  # 1: unknown package
    fake(bin_dir, "dpkg-query", query)
    fake(bin_dir, "dpkg", "exit 0" if status is not None else "exit 1")  # `dpkg -s`: it knows it
    fake(bin_dir, "apt-get", f'echo "$*" >> {calls}')
    fake(bin_dir, "id", "echo 0")
    if binary:
        fake(bin_dir, PKG, "true")
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}
    subprocess.run(["bash", str(SCRIPT), PKG], env=env, check=True, timeout=30)
    return calls.read_text().splitlines() if calls.exists() else []


@pytest.mark.parametrize(
    "status, binary",
    [
        ("deinstall ok config-files", False),  # `apt-get remove`: dpkg knows it, binary gone
        (None, False),  # never installed
        ("install ok not-installed", False),
    ],
)
def test_installs_a_package_that_is_not_installed(tmp_path, status, binary):
    calls = run(tmp_path, status, binary)
    assert calls[0].startswith("update") and calls[-1].endswith(
        f"install -y -q --no-install-recommends {PKG}"
    )


@pytest.mark.parametrize(
    "status, binary",
    [
        ("install ok installed", False),
        (None, True),  # not from apt, but its binary is on PATH
        ("deinstall ok config-files", True),
    ],
)
def test_leaves_an_installed_package_alone(tmp_path, status, binary):
    assert run(tmp_path, status, binary) == []
