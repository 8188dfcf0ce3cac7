"""The OS scheduling policy of a server's threads: the engine's at the normal policy, the rest
(the serving path, Ray's daemons and workers, HAProxy) at SCHED_BATCH when the server asks for
it (`moeserve serve --ray`'s throughput mode; docs/serving-path.md). What the engine waits on
stays normal: the expert shards, the prefix cache's Redis I/O thread and the embedded
redis-server (both started from the engine thread).

Why: where the engine's threads share cores with everything else (a CPU node; on a GPU node the
engine thread that launches kernels), a thread that wakes up under the normal policy preempts a
running one at once. Each token of each stream wakes the router's event loop, the ingress and
HAProxy, and Ray's loops wake on their timers, so the engine's OpenMP threads are cut into
hundreds of times a second. A SCHED_BATCH thread that wakes does not preempt a running thread:
it runs at once on an idle core, else at the next scheduler tick (4 ms at HZ=250), so the
serving path's wake-ups are taken a few at a time and each finds more work waiting. Measured on
2 cores at 32 streams: the serving path's CPU per token 15-20% lower, Ray's 5-20%, TTFT at one
stream unchanged (docs/benchmarks.md, fifth pass). The kernel's rule (kernel/sched/fair.c,
`check_preempt_wakeup_fair`): "Batch and idle tasks do not preempt non-idle tasks (their
preemption is driven by the tick)".

A new thread inherits the policy of the thread that creates it, and a new process that of the
thread that forks it: a driver at SCHED_BATCH before `ray.init()` puts every Ray process it
starts there, and an engine thread that returns to the normal policy before its first torch op
takes its OpenMP workers (which it creates) with it. Changing between these two policies needs
no privilege. Linux only; elsewhere every call does nothing and returns False.
"""

from __future__ import annotations

import os
import sys

SCHED_ENV = "MOESERVE_SERVING_SCHED"  # batch | normal: the policy of a server's non-engine work
POLICIES = ("batch", "normal")


def _supported() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "SCHED_BATCH")


def _policy(name: str) -> int:
    return os.SCHED_BATCH if name == "batch" else os.SCHED_OTHER


def _set(tid: int, name: str) -> bool:
    try:
        os.sched_setscheduler(tid, _policy(name), os.sched_param(0))
        return True
    except OSError:
        return False  # the thread ended meanwhile, or a sandbox refuses the call: run as is


def _check(name: str) -> None:
    if name not in POLICIES:
        raise ValueError(f"scheduling policy {name!r}: one of {POLICIES}")


def set_process(name: str) -> bool:
    """Every thread of this process to `name` (batch | normal); threads and processes it starts
    afterwards inherit it from their creator."""
    _check(name)
    if not _supported():
        return False
    tids = [int(t) for t in os.listdir("/proc/self/task")]
    return all([_set(tid, name) for tid in tids])


def set_thread(name: str) -> bool:
    """The calling thread (and the threads it starts afterwards) to `name`."""
    _check(name)
    return _supported() and _set(0, name)  # 0: the calling thread, as Linux reads it


def policy_of(tid: int) -> str:
    """`batch`, `normal` or another policy's number, of one thread (a TID; a PID names its main
    thread). For tests and diagnostics."""
    policy = os.sched_getscheduler(tid)
    return {os.SCHED_BATCH: "batch", os.SCHED_OTHER: "normal"}.get(policy, str(policy))


def policy_from_env(environ: dict[str, str] | None = None) -> str:
    """The policy SCHED_ENV asks for (unset: normal); ValueError on anything else."""
    value = (os.environ if environ is None else environ).get(SCHED_ENV, "normal").strip().lower()
    if value not in POLICIES:
        raise ValueError(f"{SCHED_ENV}={value!r}: one of {POLICIES}")
    return value
