"""An adapter canary through the real API and engine, in-process (the front end the Serve
ingress runs, on the tiny Qwen3-MoE): the rollout controllers of rollout/adapter_controllers.py
decide, the front end splits the requests for the public name between two adapter directories
sticky per session, an injected regression in the candidate is rolled back with no failed
request, and a promote leaves the candidate as the name's only version. The controller's clock
is a fake one and the Ray polling is replaced by handing the splits and outcomes over here."""

from __future__ import annotations

import openai
import pytest

from serve_app.api.routes import create_app
from serve_app.engine.config import EngineConfig
from serve_app.rollout.adapter import ADAPTER_PIN_HEADER, choose_adapter, internal_name
from serve_app.rollout.adapter_controllers import AdapterControllers
from serve_app.rollout.state import AnalysisConfig, Strategy
from serve_app.rollout.window import Outcome
from serve_app.runtime.factory import build_async_engine
from serve_app.tools.local_client import LocalEngineClient
from tests.api import inproc
from tests.lora.test_peft_format import make_peft_adapter
from tests.rollout.test_adapter_rollout import Clock, Stores

pytest.importorskip("peft")
CANARY_10 = Strategy("canary", (10, 100), interval_s=3600.0)
GATES = AnalysisConfig(interval_s=1.0, window_s=600.0, min_samples=4, max_ttft_p99_ms=None)
PROMPT = "The capital of France is"


class EngineDeployer:
    """An adapter version "deployed" as AdapterDeployer does: loaded into the engine under its
    internal name (the in-process engine stands in for a router replica)."""

    def __init__(self, engine, public: str):
        self.engine, self.public = engine, public

    def app_name(self, version: str) -> str:
        return internal_name(self.public, version)

    def deploy(self, version: str, config: dict) -> None:
        self.engine.engine.lora.load(self.app_name(version), config["model"], 0)

    def delete(self, version: str) -> None:
        pass


@pytest.fixture(scope="module")
def served(qwen3_tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("canary")
    dirs = {
        v: str(make_peft_adapter(qwen3_tiny, root / v, seed=s, target_modules=["q_proj", "v_proj"]))
        for v, s in (("v1", 1), ("v2", 2))
    }
    config = EngineConfig(
        model=str(qwen3_tiny), num_kv_blocks=128, max_lora_rank=16,
        lora_adapters=(("sql", dirs["v1"]),),
    )  # fmt: skip
    engine = build_async_engine(config)
    front = LocalEngineClient(engine, "tiny")
    ctls = AdapterControllers(Stores(), lambda public: EngineDeployer(engine, public), Clock())
    ctls.register({"sql": dirs["v1"]})
    with inproc.serving(create_app(front, api_keys=frozenset({"k"}))) as url:
        yield engine, front, ctls, dirs, openai.OpenAI(base_url=f"{url}/v1", api_key="k")
    engine.shutdown()


def complete(client: openai.OpenAI, user: str, pin: str | None = None) -> str:
    out = client.completions.create(
        model="sql", prompt=PROMPT, max_tokens=2, temperature=0, user=user,
        extra_body={"ignore_eos": True},
        extra_headers={ADAPTER_PIN_HEADER: pin} if pin else None,
    )  # fmt: skip
    assert out.model == "sql"
    return out.choices[0].text


def sync(front, ctls) -> None:
    """What the ingress's poll and flush do: outcomes to the controllers, splits back."""
    ctls.record([Outcome.from_list(o) for o in front.adapter_rollouts.take_outcomes()])
    front.adapter_rollouts.update(ctls.splits())


def test_adapter_canary_splits_sticky_then_rolls_a_regression_back_and_promotes(served):
    engine, front, ctls, dirs, client = served
    v1_text = complete(client, "before")  # no rollout yet: the config's directory
    ctls.start("sql", "v2", {"model": dirs["v2"]}, CANARY_10, GATES)
    sync(front, ctls)
    texts = {v: complete(client, "pinned", pin=v) for v in ("v1", "v2")}
    assert texts["v1"] == v1_text != texts["v2"]  # each version is its own adapter
    with pytest.raises(openai.BadRequestError, match="unknown version 'v9'") as e:
        complete(client, "pinned", pin="v9")
    assert e.value.body["param"] == ADAPTER_PIN_HEADER
    body = {"lora_name": "sql", "lora_path": dirs["v2"]}  # the rollout owns the name's versions
    with pytest.raises(openai.ConflictError, match="under a rollout"):
        client.post("/load_lora_adapter", body=body, cast_to=object)
    with pytest.raises(openai.ConflictError, match="under a rollout"):  # nor unloaded under it
        client.post("/unload_lora_adapter", body={"lora_name": "sql"}, cast_to=object)
    assert complete(client, "pinned", pin="v2") == texts["v2"]  # both versions still serve

    # 90/10 split, sticky per session: two requests per session, where the pure split says
    split = ctls.splits()["sql"]
    sessions = [f"user-{i}" for i in range(16)]
    want = {u: choose_adapter(split, u, "any", None).version for u in sessions}
    assert "v2" in want.values() and "v1" in want.values()
    for u in sessions:
        assert complete(client, u) == texts[want[u]], u
    sticky = [u for u in sessions if want[u] == "v2"] + sessions[:2]
    assert all(complete(client, u) == texts[want[u]] for u in sticky)  # the same again
    sync(front, ctls)
    m = ctls.get("sql").metrics
    on_v2 = sum(v == "v2" for v in want.values())
    assert m("v2").requests == 2 * on_v2 + 2  # + the two pinned ones
    assert m("v2").errors == 0

    # an injected regression: every candidate request fails before its first token, is
    # retried on the stable version (no client sees a failure), and the analysis rolls back
    ctls.get("sql").abort()
    ctls.start("sql", "v3", {"model": dirs["v2"], "fault_injection": {"error_rate": 1.0}},
               Strategy("canary", (50, 100), interval_s=3600.0), GATES)  # fmt: skip
    sync(front, ctls)
    on_v3 = [
        u for u in sessions if choose_adapter(ctls.splits()["sql"], u, "r", None).version == "v3"
    ]
    assert len(on_v3) >= GATES.min_samples
    assert all(complete(client, u) == v1_text for u in on_v3)  # 0 failed requests
    sync(front, ctls)
    ctls.tick()
    ctl = ctls.get("sql")
    assert ctl.state.phase == "failed" and ctl.rollbacks == {"manual": 1, "error_rate": 1}
    sync(front, ctls)
    assert ctls.splits()["sql"].weights == (("v1", 100),)
    check_rollout_gauges(ctls)

    # a promote makes the candidate the name's only split version
    ctls.start("sql", "v4", {"model": dirs["v2"]}, CANARY_10, GATES)
    ctl.promote(full=True)
    sync(front, ctls)
    assert {complete(client, u) for u in sessions[:4]} == {texts["v2"]}
    inproc.wait_idle(engine)

    # after the rollout, an unload drops the name and the version it left serving
    served_ref = ctls.splits()["sql"].refs["v4"]
    assert engine.engine.lora.get(served_ref.name) is not None
    client.post("/unload_lora_adapter", body={"lora_name": "sql"}, cast_to=object)
    assert engine.engine.lora.get(served_ref.name) is None
    with pytest.raises(openai.NotFoundError):
        complete(client, "after")


def check_rollout_gauges(ctls) -> None:
    """The controller actor's gauges of an adapter's rollout, under `<app>:<adapter>`: its
    weights, phase and each rollback once (publishing again counts none twice)."""
    import asyncio

    from serve_app.deployments.rollout_actor import adapter_rollout_label, publish_rollout
    from serve_app.metrics.backends import LocalBackend
    from serve_app.metrics.recorder import Metrics

    metrics, reported, label = Metrics(LocalBackend()), {}, adapter_rollout_label("app", "sql")
    for _ in range(2):
        publish_rollout(metrics, label, ctls.get("sql"), reported)
    page = asyncio.run(metrics.backend.exposition())
    assert 'moeserve_rollout_weight_ratio{app="app:sql",version="v1"} 1.0' in page
    assert 'moeserve_rollout_state{app="app:sql",state="failed"} 1.0' in page
    for reason in ("manual", "error_rate"):
        assert f'moeserve_rollout_rollbacks_total{{app="app:sql",reason="{reason}"}} 1.0' in page
