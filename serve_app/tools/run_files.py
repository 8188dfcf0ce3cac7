"""The files a background server keeps in .run/ (or $MOESERVE_RUN_DIR): its PID, its log and
the address of the Ray it started. `serve`, `stop` and `rollout` read them; nothing else."""

from __future__ import annotations

import os
import re
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


def log_size() -> int:
    """Where the log ends now: a start's own lines are the ones after it (the log appends)."""
    try:
        return LOG_FILE.stat().st_size
    except OSError:
        return 0


def log_since(offset: int) -> str:
    try:
        with open(LOG_FILE, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


# The last line of a Python traceback: `pkg.mod.SomeError: why` (or a bare `SomeError`).
_EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception|Exit)\b(?::\s*|$)")
MAX_CAUSE = 300


def failure_cause(log: str) -> str | None:
    """Why a server stopped, in one line, from its log: its own `error: ...` line, else the last
    exception a traceback ended with, else the last line; None for an empty log."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for pick in (
        lambda ln: ln.startswith("error:"),
        lambda ln: _EXCEPTION.match(ln) is not None,
        lambda ln: True,
    ):
        found = [ln for ln in lines if pick(ln)]
        if found:
            cause = found[-1].removeprefix("error:").strip()
            return cause if len(cause) <= MAX_CAUSE else cause[: MAX_CAUSE - 3] + "..."
    return None
