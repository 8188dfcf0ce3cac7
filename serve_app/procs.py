"""Process plumbing shared by the servers we start: free ports, liveness, and stopping a
server together with everything it started.

Each server we start leads a session of its own (start_new_session=True), so every process in
that session is ours: Ray's agents and workers change process group but keep the session.
Stopping by session therefore ends all of it and nobody else's processes (never by name).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path


def free_port() -> int:
    """A free TCP port on the loopback."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on the loopback (all held open while they are picked: one at
    a time, the kernel may hand out the same port twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def pid_alive(pid: int | None) -> bool:
    """True while `pid` exists and is not a zombie."""
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _state(pid) != "Z"


def session_pids(sid: int) -> list[int]:
    """Live processes whose session id is `sid` (Linux /proc; empty elsewhere)."""
    return _live_pids_where(3, sid)


def child_pids(pid: int) -> list[int]:
    """Live processes whose parent is `pid` (Linux /proc; empty elsewhere)."""
    return _live_pids_where(1, pid)


def thread_names(pid: int) -> dict[int, str]:
    """The process's threads, TID -> OS name (/proc/<pid>/task/<tid>/comm); empty when it
    ended meanwhile, and without threads that ended while being read (Linux /proc)."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return {}
    out = {}
    for task in tasks:
        try:
            out[int(task.name)] = (task / "comm").read_text().strip()
        except OSError:
            continue
    return out


def _live_pids_where(field: int, value: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat_fields(stat)
        # after "pid (comm)": state ppid pgrp session ...; zombies are already dead
        if fields and len(fields) > 3 and int(fields[field]) == value and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def stop_session(pid: int, grace_s: float) -> None:
    """SIGTERM `pid` (a session leader), wait up to grace_s for it to shut down cleanly, then
    SIGTERM and finally SIGKILL whatever is left of its session."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    wait_gone([pid], grace_s)
    left = [pid, *session_pids(pid)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in left:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        left = wait_gone(left, 10)
        if not left:
            return


def wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    """Wait until the processes exit; returns those still alive at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = [p for p in pids if pid_alive(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def _stat_fields(stat: Path) -> list[str] | None:
    try:
        return stat.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _state(pid: int) -> str | None:
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    return fields[0] if fields else None
