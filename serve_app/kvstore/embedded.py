"""The embedded default: a local redis-server shared by the engines of one app on one node.

Without a configured URL, the first engine of an app on a node starts `redis-server` on a free
loopback port (no persistence, maxmemory + allkeys-lru) and records {pid, port} in the app's
state file, `<base>/<owner>/state.json`; later engines of that app on the node (its other router
replicas) find it there and share it. The owner names the app: on Ray, the cluster's node
(`ray-<node id>`, unique to one Ray cluster), so a second app on the same machine (another
`make run`, a test run beside a dev server) has its own server, and stopping one app never stops
another's; in one process without Ray, the process itself. The process that started the server
stops it by PID on exit; it is also started with a parent-death signal (via setpriv, where
present), so a crashed owner leaves no stray server behind, and the next app that starts a
server removes the state of apps whose server is gone (`prune_stale_apps`). Engines that lose
it reconnect through RedisKVTier's backoff, which calls url() again: the first caller then
starts a fresh server.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from serve_app.procs import free_port, pid_alive

log = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0


def default_base_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"moeserve-redis-{os.getuid()}"


def state_dir(base: str | Path | None, owner: str | None, pid: int) -> Path:
    """Where the embedded server of one app on this node is recorded: `<base>/<owner>`.
    base None: a per-user temp dir; owner None: the process `pid` alone (no other app, and no
    other process, can reach it)."""
    name = owner if owner else f"pid-{pid}"
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
    return (Path(base) if base else default_base_dir()) / safe


class EmbeddedRedis:
    def __init__(self, state_dir: str | Path, maxmemory_mb: int, binary: str = "redis-server"):
        self.state_dir = Path(state_dir)
        self.maxmemory_mb = maxmemory_mb
        self.binary = binary
        self._proc: subprocess.Popen | None = None
        atexit.register(self.close)

    def url(self) -> str:
        """The URL of this app's embedded server on the node, starting one if none answers."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self._read_state()
            if state and pid_alive(state["pid"]) and _pings(state["port"]):
                return _url(state["port"])
            port = self._start()
            self._write_state({"pid": self._proc.pid, "port": port})
        # once per server started (an app's start, or a restart), not per reconnect
        try:
            prune_stale_apps(self.state_dir.parent, keep=self.state_dir.name)
        except OSError as e:  # tidying up: never a reason to fail the cache
            log.debug("embedded redis: pruning stale app state failed: %s", e)
        return _url(port)

    @property
    def pid(self) -> int | None:
        """PID of the server this process started (None if it uses another one's)."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def close(self) -> None:
        """Stop the server this process started (by PID); a no-op otherwise."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        state = self._read_state()
        if state and state.get("pid") == proc.pid:
            (self.state_dir / "state.json").unlink(missing_ok=True)
        log.info("embedded redis-server (pid %d) stopped", proc.pid)

    def _start(self) -> int:
        exe = shutil.which(self.binary)
        if exe is None:
            raise RuntimeError(f"{self.binary} not found on PATH; set a Redis URL instead")
        if self._proc is not None and self._proc.poll() is None:
            self.close()
        port = free_port()
        cmd = [
            exe,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--maxmemory", f"{self.maxmemory_mb}mb",
            "--maxmemory-policy", "allkeys-lru",
            "--dir", str(self.state_dir),
            "--logfile", str(self.state_dir / "redis.log"),
        ]  # fmt: skip
        setpriv = shutil.which("setpriv")
        if setpriv:  # NOTE: the signal fires when the *thread* that started it exits
            cmd = [setpriv, "--pdeathsig", "TERM", "--", *cmd]
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _pings(port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"embedded redis-server did not start (see {self.state_dir})")
            time.sleep(0.02)
        log.info(
            "embedded redis-server started: pid %d, port %d, maxmemory %d MiB, allkeys-lru",
            self._proc.pid,
            port,
            self.maxmemory_mb,
        )
        return port

    def _read_state(self) -> dict | None:
        try:
            state = json.loads((self.state_dir / "state.json").read_text())
            return state if isinstance(state.get("pid"), int) else None
        except (OSError, ValueError, AttributeError):
            return None

    def _write_state(self, state: dict) -> None:
        tmp = self.state_dir / "state.json.tmp"
        tmp.write_text(json.dumps(state))
        tmp.replace(self.state_dir / "state.json")


def prune_stale_apps(base: Path, keep: str) -> list[str]:
    """Remove the state dirs of apps whose server is gone (its recorded PID is dead): a Ray app
    whose replicas were killed never ran their exit hooks, and its node id is never used again.
    A dir without state (an app starting) or whose lock is held (an app restarting its server)
    is left alone. Returns the names removed."""
    removed = []
    for entry in base.iterdir() if base.is_dir() else ():
        state = entry / "state.json"
        if entry.name == keep or not entry.is_dir() or not state.is_file():
            continue
        try:
            with open(entry / "lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                pid = json.loads(state.read_text()).get("pid")
                if isinstance(pid, int) and not pid_alive(pid):
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(entry.name)
        except (OSError, ValueError, AttributeError):
            continue  # locked, or being written: not stale now
    return removed


def _url(port: int) -> str:
    return f"redis://127.0.0.1:{port}/0"


def _pings(port: int) -> bool:
    """A raw RESP PING: no client needed, and no password on the embedded server."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False
