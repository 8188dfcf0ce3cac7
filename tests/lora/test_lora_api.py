"""LoRA adapters over the OpenAI API, in-process (`moeserve serve`'s app): /v1/models lists
them with their parent, `model` picks one (or `<base>:<adapter>`), the openai SDK gets the
adapter's greedy tokens, adapters load and unload at run time only with the API key, and a bad
adapter is a 400 naming why while the server keeps serving, leaking nothing."""

from __future__ import annotations

import json

import openai
import pytest

from serve_app.api.routes import create_app
from serve_app.engine.config import EngineConfig
from serve_app.engine.request import SamplingParams
from serve_app.runtime.factory import build_async_engine
from serve_app.runtime.llm import LLM
from serve_app.tools.local_client import LocalEngineClient
from tests.api import inproc
from tests.lora.test_peft_format import make_peft_adapter

pytest.importorskip("peft")
KEY = "admin-key"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def adapters(qwen3_tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "qv": make_peft_adapter(
            qwen3_tiny, root / "qv", seed=1, target_modules=["q_proj", "v_proj"]
        ),
        "all": make_peft_adapter(qwen3_tiny, root / "all", seed=2, target_modules="all-linear"),
        "big": make_peft_adapter(qwen3_tiny, root / "big", seed=3, r=32, target_modules=["q_proj"]),
    }


@pytest.fixture(scope="module")
def served(qwen3_tiny, adapters):
    config = EngineConfig(
        model=str(qwen3_tiny), num_kv_blocks=128, max_lora_rank=16, max_loras=3,
        lora_adapters=(("qv", str(adapters["qv"])),),
    )  # fmt: skip
    engine = build_async_engine(config)
    app = create_app(LocalEngineClient(engine, "tiny"), api_keys=frozenset({KEY}))
    with inproc.serving(app) as url:
        yield engine, openai.OpenAI(base_url=f"{url}/v1", api_key=KEY), url
    engine.shutdown()


@pytest.fixture(scope="module")
def offline(qwen3_tiny, adapters):
    """The same adapters through the offline engine: the tokens the API must give."""
    llm = LLM(
        str(qwen3_tiny), num_kv_blocks=128,
        lora_adapters=(("qv", str(adapters["qv"])), ("all", str(adapters["all"]))),
    )  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    return {
        name: llm.generate([PROMPT], params, lora=name)[0].choices[0].text
        for name in (None, "qv", "all")
    }


def complete(client: openai.OpenAI, model: str) -> str:
    out = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.model == model
    return out.choices[0].text


def test_models_lists_adapters_with_their_parent(served):
    _, client, _ = served
    cards = {m.id: m for m in client.models.list().data}
    assert cards["qv"].parent == "tiny" and cards["tiny"].parent is None
    assert client.models.retrieve("qv").id == "qv"


def test_model_picks_the_adapter(served, offline):
    _, client, _ = served
    assert complete(client, "tiny") == offline[None]
    assert complete(client, "qv") == offline["qv"] != offline[None]
    assert complete(client, "tiny:qv") == offline["qv"]
    chat = client.chat.completions.create(
        model="qv", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert chat.model == "qv"
    with pytest.raises(openai.NotFoundError, match="The model `nope` does not exist"):
        complete(client, "nope")


def test_load_and_unload_at_run_time_with_the_key(served, adapters, offline):
    engine, client, url = served
    no_key = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong")
    body = {"lora_name": "all", "lora_path": str(adapters["all"])}
    with pytest.raises(openai.AuthenticationError):
        no_key.post("/load_lora_adapter", body=body, cast_to=object)
    client.post("/load_lora_adapter", body=body, cast_to=object)
    assert "all" in {m.id for m in client.models.list().data}
    assert complete(client, "all") == offline["all"]
    client.post("/unload_lora_adapter", body={"lora_name": "all"}, cast_to=object)
    with pytest.raises(openai.NotFoundError):
        complete(client, "all")
    assert "all" not in engine.engine.lora.names()
    with pytest.raises(openai.NotFoundError, match="is not loaded"):
        client.post("/unload_lora_adapter", body={"lora_name": "all"}, cast_to=object)
    inproc.wait_idle(engine)


def test_pinned_adapters_stay_and_one_pin_too_many_is_a_400(served, adapters, offline):
    """max_loras 3: two pins leave one slot that turns; a third pin is refused on `pinned`;
    /health reports the pins and the adapters' bytes within their budget."""
    import httpx

    engine, client, url = served
    for name in ("p1", "p2"):
        body = {"lora_name": name, "lora_path": str(adapters["qv"]), "pinned": True}
        client.post("/load_lora_adapter", body=body, cast_to=object)
    assert complete(client, "qv") == offline["qv"]
    body = {"lora_name": "all", "lora_path": str(adapters["all"])}
    client.post("/load_lora_adapter", body=body, cast_to=object)  # evicts qv, never p1 / p2
    assert complete(client, "p1") == offline["qv"]
    assert complete(client, "qv") == offline["qv"]  # back from the host tier
    lora = httpx.get(f"{url}/health").json()["lora"]
    assert sorted(lora["pinned"]) == ["p1", "p2"] and lora["resident"] == 3
    assert 0 < lora["resident_bytes"] <= lora["budget_bytes"] and lora["loads_host"] >= 1
    with pytest.raises(openai.BadRequestError, match="cannot pin LoRA adapter p3") as e:
        body = {"lora_name": "p3", "lora_path": str(adapters["qv"]), "pinned": True}
        client.post("/load_lora_adapter", body=body, cast_to=object)
    assert e.value.body["param"] == "pinned"
    assert "p3" not in {m.id for m in client.models.list().data}
    for name in ("p1", "p2", "all"):  # an explicit unload of a pinned adapter works
        client.post("/unload_lora_adapter", body={"lora_name": name}, cast_to=object)
    assert httpx.get(f"{url}/health").json()["lora"]["pinned"] == []
    inproc.wait_idle(engine)


@pytest.mark.parametrize(
    "path,message",
    [
        ("/nonexistent/adapter", "is not a directory"),
        ("BIG", "rank 32 is above the maximum 16"),
    ],
)
def test_a_bad_adapter_is_a_400_and_the_server_keeps_serving(
    served, adapters, offline, path, message
):
    engine, client, _ = served
    path = str(adapters["big"]) if path == "BIG" else path
    with pytest.raises(openai.BadRequestError, match=message) as e:
        client.post(
            "/load_lora_adapter", body={"lora_name": "bad", "lora_path": path}, cast_to=object
        )
    assert e.value.body["param"] == "lora_path"
    assert "bad" not in {m.id for m in client.models.list().data}
    assert complete(client, "qv") == offline["qv"]
    inproc.wait_idle(engine)


def test_a_server_without_keys_refuses_admin_routes(qwen3_tiny, adapters):
    import httpx

    engine = build_async_engine(EngineConfig(model=str(qwen3_tiny), num_kv_blocks=32))
    try:
        app = create_app(LocalEngineClient(engine, "tiny"), api_keys=frozenset())
        with inproc.serving(app) as url:
            body = {"lora_name": "qv", "lora_path": str(adapters["qv"])}
            r = httpx.post(f"{url}/v1/load_lora_adapter", json=body)
            assert r.status_code == 403
            assert "MOESERVE_API_KEY" in json.loads(r.text)["error"]["message"]
    finally:
        engine.shutdown()


def test_requests_and_tokens_are_counted_per_adapter(served):
    import httpx

    _, client, url = served
    complete(client, "qv")
    page = httpx.get(f"{url}/metrics").text
    lines = [ln for ln in page.splitlines() if ln.startswith("moeserve_lora_")]
    assert any(
        ln.startswith("moeserve_lora_requests_total{") and 'adapter="qv"' in ln for ln in lines
    ), lines
    assert any(
        ln.startswith("moeserve_lora_generation_tokens_total{") and 'adapter="qv"' in ln
        for ln in lines
    )
    assert not any('adapter="tiny"' in ln for ln in lines)  # the base model is not an adapter


def test_a_name_loaded_again_after_an_unload_gets_a_newer_revision():
    from serve_app.api.adapters import AdapterCatalog

    catalog = AdapterCatalog("tiny", {"a": "/v0"})
    first = catalog.next_ref("a", "/v1")
    catalog.put(first)
    catalog.remove("a")
    again = catalog.next_ref("a", "/v2")
    assert (first.revision, again.revision) == (1, 2)  # engines holding /v1 reload it


def test_an_on_demand_adapter_load_runs_off_the_event_loop(qwen3_tiny, adapters, monkeypatch):
    """A request naming an adapter the engine does not hold loads it on a worker thread
    (before_add), not on the event loop that streams every other request; a bad one is a 400
    there."""
    import asyncio
    import threading

    from serve_app.engine.errors import InvalidRequestError
    from serve_app.engine.outputs import EngineRequest, LoraRef
    from serve_app.lora.registry import LoraRegistry

    engine = build_async_engine(EngineConfig(model=str(qwen3_tiny), num_kv_blocks=32))
    threads = []
    real = LoraRegistry.resolve
    monkeypatch.setattr(
        LoraRegistry, "resolve", lambda s, *a: threads.append(threading.get_ident()) or real(s, *a)
    )
    params = SamplingParams(max_tokens=2, temperature=0)

    async def admit(ref: LoraRef) -> int:
        await engine.before_add(EngineRequest("r", [1, 2, 3], params, ref))
        return threading.get_ident()

    try:
        loop_thread = asyncio.run(admit(LoraRef("qv", str(adapters["qv"]), 0)))
        assert threads and loop_thread not in threads
        assert engine.engine.lora.get("qv") is not None  # resident: add_request_to only hits
        with pytest.raises(InvalidRequestError, match="is not a directory"):
            asyncio.run(admit(LoraRef("gone", str(adapters["qv"]) + "-gone", 0)))
    finally:
        engine.shutdown()
