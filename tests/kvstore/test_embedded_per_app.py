"""The embedded redis-server belongs to one app: its state is keyed by the app (pure
`state_dir`), and two apps on one machine each run their own, so stopping one leaves the
other's prefix tier connected, with no degradation event (real redis-servers, two processes);
the state of an app that is gone is pruned."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from serve_app.kvstore.embedded import default_base_dir, prune_stale_apps, state_dir
from tests.conftest import subprocess_env
from tests.kvstore.test_shared_prefix_cache import make_engine, prompt, publish


def test_state_dir_is_keyed_by_the_app(tmp_path):
    assert state_dir(tmp_path, "ray-1f2e", pid=7) == tmp_path / "ray-1f2e"
    # the replicas of one app on a node share it; another app (another Ray) does not
    assert state_dir(tmp_path, "ray-1f2e", 8) == state_dir(tmp_path, "ray-1f2e", 7)
    assert state_dir(tmp_path, "ray-9a9a", 7) != state_dir(tmp_path, "ray-1f2e", 7)
    # without an owner, the process alone
    assert state_dir(tmp_path, None, 7) == tmp_path / "pid-7"
    assert state_dir(tmp_path, None, 7) != state_dir(tmp_path, None, 8)
    assert state_dir(tmp_path, "a/../b c", 7) == tmp_path / "a_.._b_c"  # one dir, no escape
    base = Path(tempfile.gettempdir()) / f"moeserve-redis-{os.getuid()}"
    assert default_base_dir() == base and state_dir(None, "x", 7) == base / "x"


# The other app: its own process with an engine on the embedded default, as another
# `moeserve serve` (or another Ray cluster's replica) is. It prints its server, then waits for
# SIGTERM (what `make stop` sends), on which it exits and stops its server.
OTHER_APP = textwrap.dedent(
    """
    import json, signal, sys
    from serve_app.kvstore.settings import KVStoreConfig
    from serve_app.engine.request import SamplingParams
    from serve_app.runtime.llm import LLM

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    llm = LLM(sys.argv[1], num_kv_blocks=96, block_size=16, max_model_len=512,
              kv_store=KVStoreConfig(embedded_dir=sys.argv[2], embedded_maxmemory_mb=64))
    llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=2))
    kv = llm.engine.connector
    print(json.dumps({"url": kv.stats().url, "pid": kv.embedded.pid}), flush=True)
    while True:
        signal.pause()
    """
)


def test_stopping_one_app_leaves_the_others_embedded_redis_alone(qwen3_tiny, tmp_path):
    other = subprocess.Popen(
        [sys.executable, "-c", OTHER_APP, str(qwen3_tiny), str(tmp_path)],
        stdout=subprocess.PIPE,
        env=subprocess_env(),
        text=True,
    )
    mine = make_engine(qwen3_tiny, None, embedded_dir=str(tmp_path), embedded_maxmemory_mb=64)
    try:
        theirs = json.loads(other.stdout.readline())
        publish(mine, prompt(90))
        before = mine.engine.stats().kv_store
        assert before.connected and mine.engine.connector.embedded.pid is not None
        assert before.url != theirs["url"]  # two apps, two servers, two state dirs
        assert len(list(tmp_path.glob("*/state.json"))) == 2
        other.send_signal(signal.SIGTERM)  # the other app stops ...
        assert other.wait(timeout=60) == 0
        deadline = time.monotonic() + 10
        while _alive(theirs["pid"]):  # ... and its server with it
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for seed in range(91, 94):  # this one keeps its tier, never degraded
            publish(mine, prompt(seed))
        after = mine.engine.stats().kv_store
        assert after.connected and after.degradation_events == 0 and after.last_error is None
        assert after.url == before.url and after.blocks_published > before.blocks_published
    finally:
        if other.poll() is None:
            other.kill()
            other.wait(timeout=10)
        mine.engine.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_state_of_apps_whose_server_is_gone_is_pruned(tmp_path):
    """A Ray app's replicas are killed without running their exit hooks: its dir (named by a
    node id no app uses again) is removed by the next app that starts a server."""

    def app(name: str, state: dict | None) -> Path:
        d = tmp_path / name
        d.mkdir()
        if state is not None:
            (d / "state.json").write_text(json.dumps(state))
        return d

    dead = subprocess.Popen(["true"])
    dead.wait()
    app("ray-gone", {"pid": dead.pid, "port": 1})
    app("ray-live", {"pid": os.getpid(), "port": 2})
    app("ray-starting", None)
    busy = app("ray-restarting", {"pid": dead.pid, "port": 3})
    app("mine", {"pid": dead.pid, "port": 4})
    with open(busy / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # its app holds the lock while it restarts a server
        assert prune_stale_apps(tmp_path, keep="mine") == ["ray-gone"]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["mine", "ray-live", "ray-restarting", "ray-starting"]
