"""Where a server's CPU goes during a benchmark pass: the serving path versus the engine.

A launched server leads its own process session, so every process in it is part of the system
under test. Each process (and the engine's own thread) is sampled from /proc before and after a
pass and sorted into a role by its name:

| role | processes |
|---|---|
| `engine` | the engine thread (`moeserve-engine`); expert shards; vLLM's EngineCore and Worker |
| `proxy` | Serve's HTTP proxy actor, or HAProxy and its manager actor |
| `ingress` | the ingress replica(s) |
| `router` | router replicas, *minus* their engine thread: event loop, Serve plumbing, stream I/O |
| `api` | a one-process server (ours without Ray, vLLM's API server) minus its engine |
| `kvstore` | the shared prefix cache's Redis tier: redis-server, its `moeserve-kv-*` threads |
| `ray` | Ray's own daemons (raylet, GCS, agents, Serve controller) |

The serving path is every role but `engine`, `kvstore` and `ray`; divided by the pass's output
tokens it is the CPU that carrying one streamed token costs, whatever the accelerator does. The
in-process reference's sample (`sample_self`) takes this process and its children, so its own
embedded redis-server counts as it does for a launched server. Classification is pure
(`role_of`); only `sample_session` and `sample_self` read /proc.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from serve_app.procs import thread_names

ENGINE_THREAD = "moeserve-engine"  # threading.Thread name, as /proc/<pid>/task/<tid>/comm has it
KV_THREAD_PREFIX = "moeserve-kv-"  # the Redis tier's threads (serve_app.kvstore.redis_tier)
SERVING_ROLES = ("proxy", "ingress", "router", "api")
ROLES = ("engine", *SERVING_ROLES, "kvstore", "ray")
_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


class ProcCpu(NamedTuple):
    pid: int
    name: str  # the process title (Ray workers set `ray::ServeReplica:app:router` and the like)
    cpu_s: float  # user + system, whole process
    engine_thread_s: float  # of that, the engine thread's
    kv_thread_s: float = 0.0  # and the Redis tier's threads'


def role_of(name: str) -> str:
    """The role of a process by its title; see the module's table."""
    if "ProxyActor" in name or "HAProxy" in name or short_title(name) == "haproxy":
        return "proxy"
    if name.startswith("ray::ServeReplica:") or "ServeReplica:" in name:
        deployment = name.rsplit(":", 1)[-1].split()[0]
        return "ingress" if deployment.startswith("ingress") else "router"
    if "ExpertShard" in name or name.startswith(("VLLM::EngineCore", "VLLM::Worker")):
        return "engine"
    if short_title(name) == "redis-server":
        return "kvstore"
    if name.startswith("ray::") or _is_ray_daemon(name):
        return "ray"
    return "api"


def _is_ray_daemon(name: str) -> bool:
    daemons = ("raylet", "gcs_server", "dashboard", "runtime_env", "log_monitor", "monitor.py")
    return any(d in name for d in daemons)


@dataclass(frozen=True, slots=True)
class CpuSplit:
    """CPU seconds per role over one pass; see the module's table."""

    seconds: dict[str, float]
    by_process: dict[str, float] = field(default_factory=dict)  # short title -> CPU s

    @property
    def serving_s(self) -> float:
        return sum(self.seconds.get(r, 0.0) for r in SERVING_ROLES)

    def per_token_ms(self, output_tokens: int) -> float | None:
        return self.serving_s / output_tokens * 1000 if output_tokens else None

    def to_json(self) -> dict:
        top = sorted(self.by_process.items(), key=lambda kv: -kv[1])[:12]
        return {k: round(v, 3) for k, v in self.seconds.items()} | {
            "serving": round(self.serving_s, 3),
            "by_process": {k: round(v, 3) for k, v in top},
        }


def split(before: Iterable[ProcCpu], after: Iterable[ProcCpu]) -> CpuSplit:
    """CPU used between two samples, by role. A process that started in between counts from 0;
    one that ended in between is lost (its last seconds are not in `after`)."""
    start = {p.pid: p for p in before}
    seconds = dict.fromkeys(ROLES, 0.0)
    by_process: dict[str, float] = {}
    for p in after:
        b = start.get(p.pid)
        cpu = p.cpu_s - (b.cpu_s if b else 0.0)
        engine = p.engine_thread_s - (b.engine_thread_s if b else 0.0)
        kv = p.kv_thread_s - (b.kv_thread_s if b else 0.0)
        role = role_of(p.name)
        short = short_title(p.name)
        by_process[short] = by_process.get(short, 0.0) + cpu
        if role in ("engine", "kvstore"):
            seconds[role] += cpu
        else:
            seconds["engine"] += engine
            seconds["kvstore"] += kv
            seconds[role] += cpu - engine - kv
    return CpuSplit(seconds, by_process)


def short_title(name: str) -> str:
    """`ray::ServeReplica:app:router` as is; a path's program name for everything else."""
    head = name.split(" ", 1)[0]
    return head if head.startswith(("ray::", "VLLM::")) else head.rsplit("/", 1)[-1]


# --- /proc ----------------------------------------------------------------------------------


def sample_session(leader: int) -> list[ProcCpu]:
    """Every live process of the session `leader` leads (the leader included)."""
    from serve_app.procs import session_pids

    return _sample({p: _title(p) for p in {leader, *session_pids(leader)}})


def sample_self() -> list[ProcCpu]:
    """This process ("self") and its children (the in-process reference: its embedded
    redis-server)."""
    from serve_app.procs import child_pids

    me = os.getpid()
    return _sample({me: "self"} | {p: _title(p) for p in child_pids(me)})


def _sample(titles: dict[int, str]) -> list[ProcCpu]:
    out = []
    for pid, title in titles.items():
        cpu = _cpu_s(Path(f"/proc/{pid}/stat"))
        if cpu is None:
            continue
        out.append(ProcCpu(pid, title, cpu, *_named_threads_s(pid)))
    return out


def _cpu_s(stat: Path) -> float | None:
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # after "pid (comm)": state is field 0, utime 11, stime 12 (proc(5) fields 14 and 15)
    return (int(fields[11]) + int(fields[12])) * _TICK_S


def _named_threads_s(pid: int) -> tuple[float, float]:
    """CPU of the process's engine thread(s) and of its Redis tier's threads; zeros when the
    process ended meanwhile."""
    engine = kv = 0.0
    # empty when it ended between the listing of the session and now (short-lived helpers)
    for tid, comm in thread_names(pid).items():
        stat = Path(f"/proc/{pid}/task/{tid}/stat")
        if comm == ENGINE_THREAD:
            engine += _cpu_s(stat) or 0.0
        elif comm.startswith(KV_THREAD_PREFIX):
            kv += _cpu_s(stat) or 0.0
    return engine, kv


def _title(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()
