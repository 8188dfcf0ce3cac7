"""The Serve application (ingress -> router replica -> 2 expert shard actors) on a real local
Ray, driven by the official openai SDK and plain HTTP."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from serve_app.engine.request import SamplingParams
from serve_app.runtime.llm import LLM

pytestmark = pytest.mark.slow

PROMPTS = ["The river bends", "Once upon a time there was", "café 東京 🙂", "1, 2, 3,"]


def _client(app) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app.url}/v1", api_key="unused", max_retries=0)


def _aclient(app) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{app.url}/v1", api_key="unused", max_retries=0)


def _wait_idle(app, timeout: float = 60) -> dict:
    """/health once nothing runs and no KV block is held (a leak never gets there)."""
    deadline = time.monotonic() + timeout
    while True:
        h = httpx.get(f"{app.url}/health", timeout=10).json()
        if h.get("running") == 0 and h.get("waiting") == 0 and h.get("kv_blocks_used") == 0:
            return h
        assert time.monotonic() < deadline, f"router never went idle: {h}"
        time.sleep(0.2)


def test_health_reports_each_expert_shards_weight_bytes(serve_app):
    weights = _wait_idle(serve_app)["weights"]
    shards = weights["shard_bytes"]
    assert len(shards) == 2 and all(isinstance(b, int) and b > 0 for b in shards), weights
    assert weights["bytes"] > 0  # the router's own: attention, norms, embeddings, routers


def test_greedy_outputs_match_in_process_engine(serve_app):
    client = _client(serve_app)
    local = LLM(str(serve_app.model), num_kv_blocks=128, max_model_len=512)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ref = local.generate(PROMPTS, params)
    for prompt, r in zip(PROMPTS, ref, strict=True):
        kwargs = dict(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        got = client.completions.create(**kwargs, extra_body={"ignore_eos": True})
        assert got.choices[0].text == r.choices[0].text
        streamed = client.completions.create(**kwargs, stream=True, extra_body={"ignore_eos": True})
        assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text


def test_chat_completion_with_and_without_streaming(serve_app):
    client = _client(serve_app)
    messages = [{"role": "user", "content": "Tell me a story"}]
    full = client.chat.completions.create(
        model="tiny", messages=messages, max_completion_tokens=10, temperature=0
    )
    assert full.choices[0].message.role == "assistant"
    assert 1 <= full.usage.completion_tokens <= 10
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_completion_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    last = chunks[-1]
    assert last.choices == [] and last.usage.total_tokens == full.usage.total_tokens
    assert last.usage.completion_tokens == full.usage.completion_tokens
    # the same prompt again: its full blocks come from the router's prefix cache
    cached = last.usage.prompt_tokens_details.cached_tokens
    assert cached == (full.usage.prompt_tokens - 1) // 16 * 16


def test_32_concurrent_streams_report_exact_usage(serve_app):
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[int, int]:
        stream = await client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": f"hello {i}"}],
            max_completion_tokens=8 + i % 5,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        usage, content_chunks = None, 0
        async for chunk in stream:
            usage = chunk.usage or usage
            content_chunks += bool(chunk.choices and chunk.choices[0].delta.content is not None)
        return usage.completion_tokens, content_chunks

    async def run() -> list[tuple[int, int]]:
        client = _aclient(serve_app)
        return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(run())
    assert [tokens for tokens, _ in results] == [8 + i % 5 for i in range(32)]
    assert all(chunks >= 1 for _, chunks in results)
    _wait_idle(serve_app)


def test_client_disconnect_mid_stream_frees_blocks(serve_app):
    body = {"model": "tiny", "prompt": "A long tale", "max_tokens": 400, "stream": True}
    body["ignore_eos"] = True
    with httpx.stream("POST", f"{serve_app.url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [line for line, _ in zip(lines, range(6), strict=False) if line.startswith("data:")]
        assert got  # streaming had started when we hang up
    _wait_idle(serve_app)


def test_slow_sse_reader_gets_every_token_once_in_order(serve_app):
    """Outputs come over the output channel, coalesced when the client lags: nothing lost,
    nothing repeated, usage exact."""
    from tests.streaming_checks import check_slow_reader

    check_slow_reader(serve_app.url, "tiny", "The river bends", max_tokens=32)
    _wait_idle(serve_app)


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"prompt": "", "max_tokens": 4}, 400, "prompt"),
        ({"prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
        ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
        ({"prompt": "hi", "model": "nope"}, 404, "model"),
    ],
)
def test_bad_requests_get_4xx(serve_app, body, status, param):
    r = httpx.post(f"{serve_app.url}/v1/completions", json=body, timeout=30)
    err = r.json()["error"]
    assert r.status_code == status and err["param"] == param
    assert set(err) >= {"message", "type", "param", "code"}
    assert httpx.get(f"{serve_app.url}/health", timeout=10).json()["status"] == "ok"


def test_killed_expert_shard_is_recreated_and_service_recovers(serve_app):
    import ray

    def shard_actor_ids() -> dict[str, str]:
        """name -> actor id of the live expert shard actors (named by Serve)."""
        out = {}
        for a in ray.util.list_named_actors(all_namespaces=True):
            if "experts-" in a["name"]:
                try:
                    h = ray.get_actor(a["name"], namespace=a["namespace"])
                except ValueError:  # died between listing and lookup
                    continue
                out[a["name"]] = (h._actor_id.hex(), a["namespace"])
        return out

    before = shard_actor_ids()
    assert len(before) == 2
    victim_name = sorted(before)[0]
    victim_id, victim_ns = before[victim_name]

    max_tokens = 300  # long enough that the kill lands while every stream is running
    streaming = [asyncio.Event() for _ in range(8)]

    async def one(client: openai.AsyncOpenAI, i: int) -> str:
        try:
            stream = await client.completions.create(
                model="tiny",
                prompt=f"story number {i}",
                max_tokens=max_tokens,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            usage = None
            async for chunk in stream:
                streaming[i].set()
                usage = chunk.usage or usage
            assert usage.completion_tokens == max_tokens
            return "ok"
        except openai.APIError as e:  # the only acceptable failure is a clear 503
            assert getattr(e, "status_code", 503) == 503 or "unavailable" in str(e).lower(), e
            return "503"
        finally:
            streaming[i].set()

    async def run() -> list[str]:
        client = _aclient(serve_app)
        tasks = [asyncio.create_task(one(client, i)) for i in range(8)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in streaming)), timeout=60)
        ray.kill(ray.get_actor(victim_name, namespace=victim_ns), no_restart=True)
        return await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)

    outcomes = asyncio.run(run())
    assert set(outcomes) <= {"ok", "503"}, outcomes
    health = _wait_idle(serve_app, timeout=90)
    assert health["expert_shard_retries"] >= 1  # the kill hit calls in flight

    # recreated (a new actor under the same name), and serving again without manual action
    deadline = time.monotonic() + 90
    while True:
        after = shard_actor_ids()
        if len(after) == 2 and victim_id not in {i for i, _ in after.values()}:
            break
        assert time.monotonic() < deadline, "expert shard was not recreated"
        time.sleep(0.5)
    got = _client(serve_app).completions.create(
        model="tiny", prompt="again", max_tokens=5, extra_body={"ignore_eos": True}
    )
    assert got.usage.completion_tokens == 5


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "prompt",
    [
        ["hello there", " ".join(["word"] * 6000)],  # refused by the ingress before submitting
        [[1, 2, 3], [10**6]],  # the router refuses the second once the first is running
    ],
    ids=["too-long", "bad-token"],
)
def test_refused_multi_prompt_completion_leaves_nothing_running(serve_app, prompt, stream):
    """The first prompt alone would generate 500 tokens; after the 400 the router is idle at
    once (a leaked first prompt would keep it busy for seconds)."""
    _wait_idle(serve_app)
    body = {"prompt": prompt, "max_tokens": 500, "ignore_eos": True, "stream": stream}
    r = httpx.post(f"{serve_app.url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "prompt"
    _wait_idle(serve_app, timeout=3)


def test_a_lora_adapter_over_http_with_two_expert_actors(serve_app, qv_adapter):
    """The adapter the app config names, served by the router over remote experts: greedy
    output identical to the in-process engine with the adapter; the base model unchanged."""
    client = _client(serve_app)
    cards = {m.id: m for m in client.models.list().data}
    assert cards["qv"].parent == "tiny"
    local = LLM(
        str(serve_app.model), num_kv_blocks=128, max_model_len=512,
        lora_adapters=(("qv", str(qv_adapter)),),
    )  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = PROMPTS[:2]
    with_qv = local.generate(prompts, params, lora="qv")
    base = local.generate(prompts, params)
    for prompt, ref, plain in zip(prompts, with_qv, base, strict=True):
        kwargs = dict(prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
        got = client.completions.create(model="qv", **kwargs)
        assert got.model == "qv" and got.choices[0].text == ref.choices[0].text
        assert (
            client.completions.create(model="tiny", **kwargs).choices[0].text
            == plain.choices[0].text
        )
    assert with_qv[0].choices[0].text != base[0].choices[0].text
    _wait_idle(serve_app)


def test_expert_lora_over_http_with_two_expert_actors(serve_app, expert_adapters):
    """Adapters with routed-expert LoRA (all-linear; 3-D target_parameters), their
    expert slices applied on the 2 shard actors: greedy tokens of transformers + PEFT's merged
    model (through the in-process engine's text), and the same when base and both adapters
    run in one batch."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.lora.peft_cases import merged_checkpoint
    from tests.model.test_parity import hf_reference

    client = _client(serve_app)
    local = LLM(
        str(serve_app.model), num_kv_blocks=128, max_model_len=512,
        lora_adapters=tuple((n, str(p)) for n, p in expert_adapters.items()),
    )  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = PROMPTS[:2]
    want = {None: [r.choices[0].text for r in local.generate(prompts, params)]}
    for name, path in expert_adapters.items():
        ref_dir = merged_checkpoint(serve_app.model, path)
        refs = hf_reference(ref_dir, local.tokenizer, prompts, 12)
        ours = local.generate(prompts, params, lora=name)
        assert [r.choices[0].token_ids for r in ours] == [r[0] for r in refs]
        want[name] = [r.choices[0].text for r in ours]
        assert want[name] != want[None]

    def ask(job: tuple[str | None, int]) -> str:
        name, i = job
        kwargs = dict(max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
        got = client.completions.create(model=name or "tiny", prompt=prompts[i], **kwargs)
        return got.choices[0].text

    jobs = [(name, i) for name in want for i in range(len(prompts))]
    for job in jobs:  # alone
        assert ask(job) == want[job[0]][job[1]], job
    with ThreadPoolExecutor(len(jobs)) as pool:  # together: batches mix base and adapters
        assert list(pool.map(ask, jobs)) == [want[n][i] for n, i in jobs]
    _wait_idle(serve_app)
