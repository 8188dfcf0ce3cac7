"""Exact-state tests of the cap on distinct LoRA adapters per step and its fairness (no torch,
no model): engine/lora_cap.py inside the scheduler."""

from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from serve_app.config import LoraSettings
from serve_app.engine.block_hash import root_hash
from serve_app.engine.config import ConfigError, EngineConfig
from serve_app.engine.kv_cache_manager import KVCacheManager
from serve_app.engine.lora_cap import LoraCap
from serve_app.engine.request import RequestStatus
from serve_app.engine.scheduler import Scheduler, SchedulerConfig
from tests.engine.test_scheduler import BS, req, scheduled, step

# adapters are told apart by object, as LoraBatch groups rows
A, B, C = (SimpleNamespace(name=n) for n in "ABC")


def make(cap: int, max_seqs: int = 8, budget: int = 64) -> Scheduler:
    kv = KVCacheManager(64, BS, root_hash(0, "t"))
    return Scheduler(SchedulerConfig(max_seqs, budget, 256, True, cap), kv)


def lreq(rid: str, adapter, n: int = 4, max_tokens: int = 8):
    r = req(rid, n, max_tokens=max_tokens, base=10 * len(rid) + ord(rid[0]))
    r.lora = adapter
    return r


def adapters_running(s: Scheduler) -> set[str]:
    return {r.lora.name for r in s.running if r.lora is not None}


def test_a_request_over_the_cap_is_skipped_and_later_ones_of_admitted_adapters_go():
    s = make(cap=2)
    for r in [
        lreq("a", A, max_tokens=1), lreq("b", B), lreq("c", C), lreq("d", A, max_tokens=1),
        lreq("e", None),
    ]:  # fmt: skip
        s.add_request(r)
    # c's adapter would be the third: skipped; d (A, already in) and e (base) pass it
    assert scheduled(step(s)) == [("a", 4), ("b", 4), ("d", 4), ("e", 4)]
    assert [r.request_id for r in s.waiting] == ["c"]
    assert s.lora_cap.overtaken == {"c": 1}  # d passed it; the base model does not count
    # a and d finished (max_tokens 1): A left the set, so c gets in; running keep their slot
    assert scheduled(step(s)) == [("b", 1), ("e", 1), ("c", 4)]
    assert adapters_running(s) == {"B", "C"} and s.lora_cap.overtaken == {}


def test_the_base_model_does_not_count_and_no_cap_admits_everything():
    s = make(cap=1)
    for r in [lreq("a", A), lreq("b", None), lreq("c", None), lreq("d", B)]:
        s.add_request(r)
    assert scheduled(step(s)) == [("a", 4), ("b", 4), ("c", 4)]
    s = make(cap=None)
    for r in [lreq("a", A), lreq("b", B), lreq("c", C)]:
        s.add_request(r)
    assert scheduled(step(s)) == [("a", 4), ("b", 4), ("c", 4)] and s.lora_cap is None


def test_two_revisions_of_one_name_are_two_adapters():
    s = make(cap=1)
    old, new = SimpleNamespace(name="A"), SimpleNamespace(name="A")
    s.add_request(lreq("a", old))
    s.add_request(lreq("b", new))
    assert scheduled(step(s)) == [("a", 4)]


def test_a_held_back_adapter_gets_in_under_continuous_arrivals_of_another():
    """cap 1, max_num_seqs 4 (the patience): a new A request arrives every step, so without
    fairness A would always be running and B never get in. After 4 A requests pass B the set
    closes to A, A's running requests drain, and B runs; base requests flow throughout."""
    s = make(cap=1, max_seqs=4)
    s.add_request(lreq("a0", A, max_tokens=3))
    s.add_request(lreq("b", B, max_tokens=2))
    admitted_at, log = {}, []
    for t in range(1, 16):
        s.add_request(lreq(f"a{t}", A, max_tokens=3))
        if t % 3 == 0:
            s.add_request(lreq(f"x{t}", None, max_tokens=1))
        out = step(s)
        for r in out.requests[out.num_running_scheduled :]:
            admitted_at[r.request_id] = t
        names = {r.lora.name for r in out.requests if r.lora is not None}
        assert len(names) <= 1, (t, names)
        log.append(sorted(r.request_id for r in out.requests))
    # a1..a4 pass b at steps 1-4 (the 4th closes the set: b's patience is max_num_seqs 4)
    assert log[:4] == [
        ["a0", "a1"], ["a0", "a1", "a2"], ["a0", "a1", "a2", "a3"], ["a2", "a3", "a4", "x3"],
    ]  # fmt: skip
    # steps 5-6: closed to A although there is room (a5 waits); a base request still goes;
    # the running A requests drain, and at step 7 b gets in
    assert log[4:7] == [["a3", "a4"], ["a4", "x6"], ["b"]]
    assert admitted_at["b"] == 7 and s.lora_cap.overtaken == {}
    # then A is the one held back (nothing passes it), and gets in once b (2 tokens) is done
    assert admitted_at["a5"] == 9 and log[8] == ["a5", "a6", "a7", "a8"]


def test_a_finished_held_back_request_is_forgotten():
    s = make(cap=1)
    for r in [lreq("a", A), lreq("b", B), lreq("c", A)]:
        s.add_request(r)
    step(s)
    assert s.lora_cap.overtaken == {"b": 1}
    s.finish_requests(["b"], RequestStatus.FINISHED_ABORTED)
    assert s.lora_cap.overtaken == {} and [r.request_id for r in s.waiting] == []


def test_bad_caps_are_refused():
    with pytest.raises(ConfigError, match="max_loras_per_batch must be in"):
        EngineConfig(model="m", max_loras=4, max_loras_per_batch=5)
    with pytest.raises(ConfigError, match="max_loras_per_batch must be in"):
        EngineConfig(model="m", max_loras_per_batch=0)
    assert EngineConfig(model="m", max_loras=4, max_loras_per_batch=4).max_loras_per_batch == 4
    with pytest.raises(ValidationError, match="must not exceed max_loras"):
        LoraSettings(max_loras=2, max_loras_per_batch=3)
    with pytest.raises(ValidationError):
        LoraSettings(max_loras_per_batch=0)
    with pytest.raises(ValueError):
        LoraCap(0, patience=1)


def test_the_cli_flags_reach_the_app_config():
    from serve_app.cli.main import build_parser
    from serve_app.tools.ray_server import app_config

    args = build_parser().parse_args(
        ["serve", "--model", "m", "--max-loras", "4", "--max-loras-per-batch", "2"]
    )
    config = app_config(args, num_cpus=2)
    assert (config.lora.max_loras, config.lora.max_loras_per_batch) == (4, 2)
    assert config.engine_config().max_loras_per_batch == 2
