"""The rollout controller with an in-memory store and a recording deployer (no Ray)."""

import pickle

import pytest

from serve_app.rollout.controller import RETIRE_GRACE_S, RolloutController, VersionSplit
from serve_app.rollout.state import AnalysisConfig, RolloutError, Strategy, Version
from serve_app.rollout.window import Outcome, OutcomeWindow, p99

BASE = Version("v1", "/m/v1")
CANARY = Strategy("canary", (25, 50, 100), interval_s=10.0)
FAST = AnalysisConfig(interval_s=1.0, window_s=30.0, min_samples=4, scale_down_delay_s=60.0)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class MemoryStore:
    def __init__(self):
        self.text = None

    def load(self):
        return self.text

    def save(self, text):
        self.text = text


class Deployer:
    def __init__(self, fail: bool = False):
        self.calls: list[tuple[str, str]] = []
        self.fail = fail

    def app_name(self, version):
        return f"app--{version}"

    def deploy(self, version, config):
        self.calls.append(("deploy", version))
        if self.fail:
            raise RuntimeError("replica failed to start")
        return f"sha256:{version}"

    def delete(self, version):
        self.calls.append(("delete", version))


def make(store=None, deployer=None):
    clock = Clock()
    ctl = RolloutController(BASE, store or MemoryStore(), deployer or Deployer(), clock)
    return ctl, clock


def feed(ctl, version, n, ok=True, ms=50.0):
    ctl.record([Outcome(version, ok, ms, ms * 2) for _ in range(n)])


def test_start_deploys_the_candidate_before_it_gets_traffic():
    ctl, _ = make()
    ctl.start("v2", {"model": "/m/v2"}, CANARY, FAST)
    assert ctl.deployer.calls == [("deploy", "v2")]
    r = ctl.version_split()
    assert r.weights == (("v2", 25), ("v1", 75))
    assert r.apps == {"v2": "app--v2", "v1": None} and r.stable == "v1"
    assert ctl.state.candidate == Version("v2", "/m/v2", "sha256:v2")  # as its routers report


def test_a_refused_start_deploys_nothing():
    ctl, _ = make()
    ctl.start("v2", {"model": "/m/v2"}, CANARY, FAST)
    with pytest.raises(RolloutError, match="rollout of v2 is progressing"):
        ctl.start("v3", {"model": "/m/v3"}, CANARY, FAST)
    with pytest.raises(RolloutError, match="already deployed once"):
        ctl.start("v1", {"model": "/m/v1"}, CANARY, FAST)
    assert ctl.deployer.calls == [("deploy", "v2")]


def test_a_failed_deploy_is_cleaned_up_and_changes_nothing():
    ctl, _ = make(deployer=Deployer(fail=True))
    before = ctl.state
    with pytest.raises(RolloutError, match="deploying v2 failed: replica failed to start"):
        ctl.start("v2", {"model": "/m/v2"}, CANARY, FAST)
    assert ctl.state == before
    assert ctl.deployer.calls == [("deploy", "v2"), ("delete", "v2")]


def test_errors_roll_back_at_once_and_the_candidate_is_deleted():
    ctl, clock = make()
    ctl.start("v2", {"model": "/m/v2"}, CANARY, FAST)
    feed(ctl, "v2", 5, ok=False)
    feed(ctl, "v1", 20)
    clock.now += 1
    s = ctl.tick()
    assert s.phase == "failed" and s.weights == (("v1", 100),)
    assert "error rate 100.00%" in s.reason
    # out of the routing table at once; its app goes only after the grace (stale ingresses)
    assert ctl.version_split().weights == (("v1", 100),)
    assert ("delete", "v2") not in ctl.deployer.calls
    clock.now += RETIRE_GRACE_S - 1
    ctl.tick()
    assert ("delete", "v2") not in ctl.deployer.calls
    clock.now += 1
    ctl.tick()
    assert ctl.deployer.calls[-1] == ("delete", "v2")
    assert ctl.rollbacks == {"error_rate": 1}
    assert ctl.status()["state"]["phase"] == "failed"


def test_too_few_samples_hold_then_healthy_steps_promote_and_the_old_stable_retires():
    ctl, clock = make()
    ctl.start("v2", {"model": "/m/v2"}, CANARY, FAST)
    feed(ctl, "v2", 2)
    clock.now += 11
    assert ctl.tick().last_verdict == "inconclusive"
    for weight in (50,):
        feed(ctl, "v2", 10)
        clock.now += 11
        assert ctl.tick().weights == (("v2", weight), ("v1", 100 - weight))
    feed(ctl, "v2", 10)
    clock.now += 11
    s = ctl.tick()
    assert s.phase == "promoted" and s.stable.name == "v2"
    assert s.weights == (("v2", 100), ("v1", 0))
    clock.now += 61
    s = ctl.tick()
    assert s.weights == (("v2", 100),)
    # v1 is the base app's own router: never deleted by the controller.
    assert ("delete", "v1") not in ctl.deployer.calls


def test_undo_redeploys_a_version_whose_app_was_deleted():
    ctl, clock = make()
    ctl.start("v2", {"model": "/m/v2"}, CANARY, FAST)
    ctl.promote(full=True)
    ctl.start("v3", {"model": "/m/v3"}, CANARY, FAST)
    ctl.promote(full=True)  # v2 retiring at 0%
    clock.now += 61
    ctl.tick()  # v2 leaves the weights
    clock.now += RETIRE_GRACE_S
    ctl.tick()  # and its app is deleted after the grace
    assert ctl.deployer.calls[-1] == ("delete", "v2")
    s = ctl.undo("v2")
    assert ctl.deployer.calls[-1] == ("deploy", "v2")
    assert s.stable.name == "v2" and s.weights == (("v2", 100), ("v3", 0))
    s = ctl.undo()  # default: the stable before the current one
    assert s.stable.name == "v3"
    with pytest.raises(RolloutError, match="unknown version 'v9'"):
        ctl.undo("v9")


def test_the_state_survives_a_new_controller_on_the_same_store():
    store = MemoryStore()
    ctl, _ = make(store=store)
    ctl.start("v2", {"model": "/m/v2"}, CANARY, FAST)
    ctl.pause()
    again, _ = make(store=store)
    assert again.state == ctl.state and again.state.phase == "paused"
    assert again.version_split() == ctl.version_split()
    assert again.configs == {"v2": {"model": "/m/v2"}}


def test_a_redeployed_base_ends_the_old_rollout():
    store = MemoryStore()
    ctl, _ = make(store=store)
    ctl.start("v2", {"model": "/m/v2"}, CANARY, FAST)
    ctl.ensure_base(BASE)  # same base: nothing happens
    assert ctl.state.phase == "progressing"
    ctl.ensure_base(Version("v7", "/m/v7"))
    assert ctl.deployer.calls[-1] == ("delete", "v2")
    assert ctl.state.stable.name == "v7" and ctl.version_split().apps == {"v7": None}


def test_window_counts_one_version_over_its_window():
    w = OutcomeWindow(horizon_s=10.0)
    w.add(Outcome("a", True, 10.0, 20.0), now=0.0)
    w.add(Outcome("a", False), now=5.0)
    w.add(Outcome("b", True, 1.0, 2.0), now=5.0)
    m = w.metrics("a", now=6.0, window_s=10.0)
    assert (m.requests, m.errors, m.samples, m.ttft_p99_ms, m.e2e_p99_ms) == (2, 1, 1, 10.0, 20.0)
    m = w.metrics("a", now=12.0, window_s=10.0)  # the first one expired
    assert (m.requests, m.errors, m.samples) == (1, 1, 0)
    assert p99([float(i) for i in range(1, 101)]) == 99.0 and p99([]) is None
    assert Outcome.from_list(Outcome("a", True, 1.0, None).to_list()) == Outcome("a", True, 1.0)


def test_a_retired_version_is_deleted_by_a_restarted_controller_too():
    store = MemoryStore()
    ctl, clock = make(store=store)
    ctl.start("v2", {"model": "/m/v2"}, CANARY, FAST)
    ctl.abort()
    assert ("delete", "v2") not in ctl.deployer.calls
    split = ctl.version_split()
    assert isinstance(split, VersionSplit)
    assert pickle.loads(pickle.dumps(split)) == split  # as the actor sends it to the ingress
    again, again_clock = make(store=store)
    again_clock.now = clock.now + RETIRE_GRACE_S
    again.tick()
    assert again.deployer.calls == [("delete", "v2")]
