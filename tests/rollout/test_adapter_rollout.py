"""Adapter rollouts: the split of one public adapter name between two adapter directories
(rollout/adapter.py) and the per-adapter controllers (rollout/adapter_controllers.py), with an
in-memory store and a recording deployer (no Ray, no engine)."""

import pytest

from serve_app.engine.outputs import LoraRef
from serve_app.rollout.adapter import adapter_split, choose_adapter, internal_name
from serve_app.rollout.adapter_controllers import AdapterControllers
from serve_app.rollout.state import AnalysisConfig, RolloutError, Strategy
from serve_app.rollout.window import Outcome
from tests.rollout.test_rollout_controller import Clock, MemoryStore

CANARY_10 = Strategy("canary", (10, 100), interval_s=3600.0)
GATES = AnalysisConfig(interval_s=1.0, window_s=600.0, min_samples=20, max_ttft_p99_ms=None)


class Stores(dict):
    def __call__(self, key):
        return self.setdefault(key, MemoryStore())


class Deployer:
    """Records the adapter versions it was asked to check; `bad` ones fail."""

    def __init__(self, public, bad=()):
        self.public, self.bad, self.calls = public, set(bad), []

    def app_name(self, version):
        return internal_name(self.public, version)

    def deploy(self, version, config):
        self.calls.append(("deploy", version, config["model"]))
        if version in self.bad:
            raise ValueError("not a PEFT adapter")

    def delete(self, version):
        self.calls.append(("delete", version))


def make(stores=None, bad=()):
    clock = Clock()
    deployers = {}

    def deployer(public):
        return deployers.setdefault(public, Deployer(public, bad))

    ctls = AdapterControllers(Stores() if stores is None else stores, deployer, clock)
    ctls.register({"sql": "/a/sql-v1"})
    return ctls, clock, deployers


def test_a_90_10_canary_over_2000_requests_sends_10_percent_sticky_per_session():
    ctls, _, _ = make()
    ctls.start("sql", "v2", {"model": "/a/sql-v2"}, CANARY_10, GATES)
    split = ctls.splits()["sql"]
    assert split.weights == (("v2", 10), ("sql-v1", 90))
    picks = [choose_adapter(split, f"session-{i}", f"req-{i}", None) for i in range(2000)]
    share = sum(c.version == "v2" for c in picks) / len(picks)
    assert abs(share - 0.10) <= 0.02, share
    # sticky: a session's later requests (other request ids) land where its first did
    again = [choose_adapter(split, f"session-{i}", f"req-b{i}", None) for i in range(2000)]
    assert [c.version for c in again] == [c.version for c in picks]
    # the engines hold each version under its own name, loaded from its own directory
    on_v2 = next(c for c in picks if c.version == "v2")
    assert on_v2.ref == LoraRef("sql@v2", "/a/sql-v2", 0) and on_v2.retry
    assert on_v2.on_stable().ref == LoraRef("sql@sql-v1", "/a/sql-v1", 0)
    assert not on_v2.on_stable().retry


def test_the_adapter_salt_puts_other_sessions_on_another_adapters_canary():
    ctls, _, _ = make()
    ctls.register({"chat": "/a/chat-v1"})
    ctls.start("sql", "v2", {"model": "/a/sql-v2"}, CANARY_10, GATES)
    ctls.start("chat", "v2", {"model": "/a/chat-v2"}, CANARY_10, GATES)
    splits = ctls.splits()

    def on(name):
        return {
            i for i in range(500) if choose_adapter(splits[name], str(i), "r", None).version == "v2"
        }

    assert on("sql") != on("chat")


def test_a_pin_picks_a_version_even_at_0_percent_and_an_unknown_pin_is_refused():
    ctls, _, _ = make()
    ctls.start("sql", "v2", {"model": "/a/sql-v2"}, Strategy("bluegreen", auto=False), GATES)
    split = ctls.splits()["sql"]
    assert split.weights == (("v2", 0), ("sql-v1", 100))
    assert {choose_adapter(split, str(i), "r", None).version for i in range(200)} == {"sql-v1"}
    pinned = choose_adapter(split, "s", "r", "v2")
    assert pinned.version == "v2" and not pinned.retry  # a pinned request fails as it is
    with pytest.raises(RolloutError, match="unknown version 'v9'"):
        choose_adapter(split, "s", "r", "v9")


def test_a_regression_rolls_the_adapter_back_and_promote_makes_the_candidate_its_only_version():
    ctls, clock, _ = make()
    ctls.start(
        "sql", "v2", {"model": "/a/sql-v2", "fault_injection": {"error_rate": 1.0}}, CANARY_10,
        GATES,
    )  # fmt: skip
    assert ctls.splits()["sql"].error_rates == {"v2": 1.0}
    ctls.record([Outcome("v2", False, target="sql")] * 20)
    ctls.record([Outcome("v2", True, 5.0, 9.0, target="chat")] * 20)  # another adapter's
    ctls.record([Outcome("v2", True, 5.0, 9.0)] * 20)  # the model's v2, not the adapter's
    ctls.tick()
    ctl = ctls.get("sql")
    assert ctl.state.phase == "failed" and ctl.rollbacks == {"error_rate": 1}
    assert ctls.splits()["sql"].weights == (("sql-v1", 100),)
    # a healthy v3 promoted: it alone serves the name; v1 stays at 0% for an instant undo
    ctls.start("sql", "v3", {"model": "/a/sql-v3"}, CANARY_10, GATES)
    clock.now += 1
    ctl.promote(full=True)
    split = ctls.splits()["sql"]
    assert split.weights == (("v3", 100), ("sql-v1", 0)) and split.stable == "v3"
    assert split.refs["v3"] == LoraRef("sql@v3", "/a/sql-v3", 0)
    status = ctls.status("sql")
    assert status["adapter"] == "sql" and status["apps"]["v3"] == "sql@v3"


def test_a_first_rollout_needs_the_stable_directory_and_a_new_version_name():
    ctls, _, deployers = make(bad={"broken"})
    with pytest.raises(RolloutError, match="not in the app's config"):
        ctls.start("other", "v2", {"model": "/a/o2"}, CANARY_10, GATES)
    with pytest.raises(RolloutError, match="stable version's name"):
        ctls.start("sql", "sql-v1", {"model": "/a/sql-v1b"}, CANARY_10, GATES)
    with pytest.raises(RolloutError, match="without '@'"):
        ctls.start("sql", "a@b", {"model": "/a/x"}, CANARY_10, GATES)
    with pytest.raises(RolloutError, match="deploying broken failed: not a PEFT adapter"):
        ctls.start("sql", "broken", {"model": "/a/broken"}, CANARY_10, GATES)
    assert "sql" not in ctls.splits()  # nothing routes by a rollout that never started
    ctls.start("other", "v2", {"model": "/a/o2"}, CANARY_10, GATES, stable_path="/a/o1/")
    assert ctls.get("other").state.stable.name == "o1"
    assert deployers["other"].calls == [("deploy", "v2", "/a/o2")]
    with pytest.raises(RolloutError, match="no rollout of adapter 'nope'"):
        ctls.get("nope")


def test_controllers_come_back_from_their_store():
    stores = Stores()
    ctls, _, _ = make(stores)
    ctls.start("sql", "v2", {"model": "/a/sql-v2"}, CANARY_10, GATES)
    again, _, _ = make(stores)
    assert again.splits() == ctls.splits()
    assert again.get("sql").state.stable.model_path == "/a/sql-v1"


def test_outcomes_carry_their_adapter_over_the_wire():
    o = Outcome("v2", True, 1.0, 2.0, target="sql")
    assert Outcome.from_list(o.to_list()) == o
    assert Outcome.from_list(["v2", False, None, None]) == Outcome("v2", False)  # older ingress


def test_adapter_split_lists_every_weighted_version():
    ctls, _, _ = make()
    ctls.start("sql", "v2", {"model": "/a/sql-v2"}, CANARY_10, GATES)
    ctl = ctls.get("sql")
    split = adapter_split("sql", ctl.state, ctl.configs, ctl.generation)
    assert set(split.refs) == {"v2", "sql-v1"} and split.error_rates == {}


def test_each_adapter_is_analysed_at_its_own_interval():
    ctls, clock, _ = make()
    ctls.register({"chat": "/a/chat-v1"})
    ctls.start("sql", "v2", {"model": "/a/sql-v2"}, CANARY_10, GATES)  # every 1 s
    slow = AnalysisConfig(interval_s=30.0, min_samples=20, max_ttft_p99_ms=None)
    ctls.start("chat", "v2", {"model": "/a/chat-v2"}, CANARY_10, slow)
    assert ctls.min_interval() == 1.0
    for _ in range(3):
        ctls.tick()
        clock.now += 1.0
    assert (ctls.get("sql").analyses, ctls.get("chat").analyses) == (3, 1)
