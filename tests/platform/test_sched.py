"""serve_app.platform.sched on this machine's kernel: real sched_setscheduler calls, made in a
child process so that pytest's own threads keep their policy."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from serve_app.platform import sched

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux policies")


def _run(code: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_batch_process_keeps_its_engine_thread_and_what_it_starts_normal() -> None:
    got = _run(
        """
        import json, os, subprocess, sys, threading
        from serve_app.platform import sched

        def policy():
            return sched.policy_of(threading.get_native_id())

        seen = {}
        idle = threading.Event()
        early = threading.Thread(target=idle.wait)  # a thread that exists before the call
        early.start()
        assert sched.set_process("batch")
        seen["main"], seen["early"] = policy(), sched.policy_of(early.native_id)

        def engine():
            assert sched.set_thread("normal")
            seen["engine"] = policy()
            worker = threading.Thread(target=lambda: seen.__setitem__("engine_worker", policy()))
            worker.start(); worker.join()

        t = threading.Thread(target=engine); t.start(); t.join()
        later = threading.Thread(target=lambda: seen.__setitem__("later", policy()))
        later.start(); later.join()
        child = subprocess.run(
            [sys.executable, "-c", "import os; print(os.sched_getscheduler(0))"],
            capture_output=True, text=True, check=True)
        seen["child"] = "batch" if int(child.stdout) == os.SCHED_BATCH else child.stdout.strip()
        idle.set(); early.join()
        print(json.dumps(seen))
        """
    )
    assert got == {
        "main": "batch",
        "early": "batch",  # every thread of the process, not only the caller
        "engine": "normal",
        "engine_worker": "normal",  # the engine's OpenMP workers: started by it, inherit it
        "later": "batch",
        "child": "batch",  # Ray's daemons and workers, started by the driver
    }


def test_the_policy_comes_from_the_environment() -> None:
    assert sched.policy_from_env({}) == "normal"
    assert sched.policy_from_env({sched.SCHED_ENV: " Batch "}) == "batch"
    with pytest.raises(ValueError, match="MOESERVE_SERVING_SCHED"):
        sched.policy_from_env({sched.SCHED_ENV: "fifo"})
    with pytest.raises(ValueError):
        sched.set_process("fifo")
