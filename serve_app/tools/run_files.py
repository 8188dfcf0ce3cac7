"""The files a background server keeps in .run/ (or $MOESERVE_RUN_DIR): its PID, its log and
the address of the Ray it started. `serve`, `stop` and `rollout` read them; nothing else."""

from __future__ import annotations

import os
from pathlib import Path

from serve_app.procs import pid_alive

RUN_DIR = Path(os.environ.get("MOESERVE_RUN_DIR", ".run"))
PID_FILE = RUN_DIR / "server.pid"
LOG_FILE = RUN_DIR / "server.log"
ADDRESS_FILE = RUN_DIR / "ray_address"  # the GCS address of the Ray that `--ray` started


def read_pid() -> int | None:
    try:
        return int(PID_FILE.read_text().strip())
    except (OSError, ValueError):
        return None


def local_ray_address() -> str | None:
    """The Ray cluster of the server `make run` started from this directory, if it runs."""
    if pid_alive(read_pid()) and ADDRESS_FILE.is_file():
        return ADDRESS_FILE.read_text().strip() or None
    return None
