"""Engine behaviour on a real tiny checkpoint: sampling, stops, n > 1, bad input, no leaks."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from serve_app.engine.config import EngineConfig
from serve_app.engine.errors import InvalidRequestError
from serve_app.engine.outputs import EngineRequest
from serve_app.engine.request import SamplingParams
from serve_app.runtime.factory import build_async_engine
from serve_app.runtime.llm import LLM
from serve_app.tools.local_client import LocalEngineClient

PROMPTS = ["The river bends", "Once upon a time there was", "café 東京 🙂", "1, 2, 3,"]


@pytest.fixture(scope="module")
def llm(qwen3_tiny) -> LLM:
    return LLM(str(qwen3_tiny), num_kv_blocks=128, block_size=16, max_model_len=512)


async def generate(client: LocalEngineClient, prompt, params: SamplingParams):
    """A request through the in-process front end (text in, text deltas out)."""
    submitted = await client.submit(prompt, params, uuid.uuid4().hex)
    async for out in submitted.stream:
        yield out


def assert_no_leaks(llm: LLM) -> None:
    s = llm.engine.stats()
    assert s.kv_blocks_used == 0 and s.num_running == 0 and s.num_waiting == 0
    assert not llm.engine.has_unfinished_requests()
    assert len(llm.engine.runner.sampler.states) == 0  # seeded generators released on finish


def test_seeded_sampling_is_reproducible_regardless_of_batch(llm):
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12)
    alone = llm.generate([PROMPTS[0]], p)[0].choices[0].token_ids
    mixed = (
        llm.generate(
            [PROMPTS[1], PROMPTS[0], PROMPTS[2]],
            [SamplingParams(temperature=1.0, max_tokens=12), p, SamplingParams(max_tokens=5)],
        )[1]
        .choices[0]
        .token_ids
    )
    assert alone == mixed
    other = llm.generate([PROMPTS[0]], SamplingParams(temperature=1.0, seed=99, max_tokens=12))
    assert other[0].choices[0].token_ids != alone
    assert_no_leaks(llm)


def test_n_choices_share_prompt_and_differ(llm):
    res = llm.generate(
        [PROMPTS[1]], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    )
    choices = res[0].choices
    assert [c.index for c in choices] == [0, 1, 2]
    assert all(len(c.token_ids) == 10 and c.finish_reason == "length" for c in choices)
    assert len({tuple(c.token_ids) for c in choices}) > 1
    again = llm.generate(
        [PROMPTS[1]], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    )
    assert [c.token_ids for c in again[0].choices] == [c.token_ids for c in choices]
    assert_no_leaks(llm)


def test_stop_string_and_stop_token(llm):
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    base = llm.generate([PROMPTS[1]], greedy)[0].choices[0]
    text = base.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop) == 3 and stop.strip()
    res = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=24, stop=[stop]))
    c = res[0].choices[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == text[: text.index(stop)]

    stop_id = base.token_ids[5]
    res = llm.generate(
        [PROMPTS[1]], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_id])
    )
    c = res[0].choices[0]
    first = base.token_ids.index(stop_id)
    assert c.finish_reason == "stop" and c.stop_reason == stop_id
    assert c.token_ids == base.token_ids[: first + 1]
    assert_no_leaks(llm)


def test_logprobs_are_distributions(llm):
    res = llm.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=6, logprobs=5))
    import math

    for lp in res[0].choices[0].logprobs:
        assert len(lp.top) == 5
        assert sum(math.exp(v) for _, v in lp.top) <= 1.0 + 1e-5
        assert lp.token_id == lp.top[0][0]  # greedy picks the top token


@pytest.mark.parametrize(
    "prompt, params, param",
    [
        ("", SamplingParams(), "prompt"),
        ([], SamplingParams(), "prompt"),
        ([1, 2, 10**9], SamplingParams(), "prompt"),
        ([-1], SamplingParams(), "prompt"),
        ("hi " * 600, SamplingParams(), "prompt"),
        ("hi", SamplingParams(max_tokens=10_000), "max_tokens"),
    ],
)
def test_bad_input_raises_typed_errors(llm, prompt, params, param):
    """The front end refuses an empty prompt; the engine ids outside the vocabulary and what
    does not fit the context."""
    with pytest.raises(InvalidRequestError) as e:
        llm.engine.add_request(EngineRequest("bad", llm.processor.encode(prompt), params))
    assert e.value.param == param
    assert_no_leaks(llm)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_k=-5),
        dict(n=0),
        dict(max_tokens=0),
        dict(logprobs=99),
        dict(presence_penalty=3),
        dict(stop=[""]),
        dict(min_tokens=5, max_tokens=2),
    ],
)
def test_bad_sampling_params(kwargs):
    with pytest.raises(InvalidRequestError):
        SamplingParams(**kwargs)


async def test_async_stream_and_abort_free_blocks(qwen3_tiny):
    engine = build_async_engine(
        EngineConfig(model=str(qwen3_tiny), num_kv_blocks=64, max_model_len=512)
    )
    client = LocalEngineClient(engine, "tiny")
    try:
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        outs = [o async for o in generate(client, PROMPTS[0], params)]
        assert outs[-1].finished and sum(len(o.outputs[0].token_ids) for o in outs) == 16

        # Abort mid-stream by leaving the loop early; run several concurrently.
        async def partial(i: int) -> int:
            got = 0
            long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
            async for _ in generate(client, PROMPTS[i % 4], long):
                got += 1
                if got == 3:
                    break
            return got

        assert await asyncio.gather(*(partial(i) for i in range(6))) == [3] * 6
        for _ in range(100):
            s = engine.stats()
            if s.kv_blocks_used == 0 and s.num_running == 0 and engine.num_in_flight == 0:
                break
            await asyncio.sleep(0.05)
        s = engine.stats()
        assert s.kv_blocks_used == 0 and s.num_running == 0 and s.num_waiting == 0

        with pytest.raises(InvalidRequestError):
            await client.submit("", params, "empty")
    finally:
        engine.shutdown()


async def test_async_engine_reports_autoscaling_signals(qwen3_tiny):
    from autoscaling.signals import TTFT_P90_KEY, RouterSignals
    from serve_app.deployments.router import load_signals

    engine = build_async_engine(
        EngineConfig(model=str(qwen3_tiny), num_kv_blocks=64, max_model_len=512, max_num_seqs=2)
    )
    client = LocalEngineClient(engine, "tiny")
    try:
        idle = load_signals(engine)
        assert idle == RouterSignals(waiting=0, running=0, kv_use=0.0, ttft_p90_ms=None)
        assert TTFT_P90_KEY not in idle.to_stats()  # no request yet: missing, not 0

        params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

        async def one(i: int) -> None:
            async for _ in generate(client, PROMPTS[i % 4], params):
                pass

        tasks = [asyncio.create_task(one(i)) for i in range(4)]
        for _ in range(200):  # stats are refreshed after each step
            busy = load_signals(engine)
            if busy.running == 2:
                break
            await asyncio.sleep(0.01)
        # max_num_seqs 2: two run, two wait
        assert busy.running == 2 and busy.waiting == 2 and 0 < busy.kv_use <= 1
        await asyncio.gather(*tasks)
        done = load_signals(engine)
        assert done.running == 0 and done.waiting == 0
        assert done.ttft_p90_ms is not None and done.ttft_p90_ms > 0
        assert len(engine.ttft) == 4  # one TTFT per request
    finally:
        engine.shutdown()


async def test_a_lagging_stream_gets_its_backlog_as_one_item(qwen3_tiny):
    """Consumer-paced coalescing: what piled up while nobody read comes as one increment, in
    order, nothing lost; a sink gets each step's token output as it is made."""
    engine = build_async_engine(
        EngineConfig(model=str(qwen3_tiny), num_kv_blocks=64, max_model_len=512)
    )
    client = LocalEngineClient(engine, "tiny")
    try:
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0)
        want = [o async for o in generate(client, PROMPTS[1], params)]
        assert len(want) == 16  # read as fast as made: one token per item

        stream = (await client.submit(PROMPTS[1], params, "lagging")).stream
        for _ in range(200):  # the engine finishes it while nobody reads
            if engine.num_in_flight == 0:
                break
            await asyncio.sleep(0.02)
        got = [o async for o in stream]
        assert len(got) == 1 and got[0].finished
        ids = [t for o in want for t in o.outputs[0].token_ids]
        assert got[0].outputs[0].token_ids == ids
        assert [lp.token_id for lp in got[0].outputs[0].logprobs] == ids
        assert got[0].outputs[0].text == "".join(o.outputs[0].text for o in want)

        class Sink:
            def __init__(self):
                self.items = []

            def put_nowait(self, item):
                self.items.append(item)

        sink = Sink()
        prompt = client.encode_prompt(PROMPTS[1])
        engine.add_request_to([EngineRequest("sunk", prompt, params)], sink)
        for _ in range(200):
            if sink.items and sink.items[-1].finish_reason is not None:
                break
            await asyncio.sleep(0.02)
        assert [o.new_token_ids[0] for o in sink.items] == ids
    finally:
        engine.shutdown()
