"""The token-in/token-out split: the engine (the router replica's step thread) makes no text;
the front end tokenizes a prompt once per request and does every piece of text work.

On the tiny checkpoint, in-process: the same front end (api/frontend.py) the Serve ingress runs,
over AsyncLLMEngine instead of the router replicas."""

from __future__ import annotations

import asyncio
import threading
import uuid

import httpx
import pytest

import serve_app.engine.parts as parts_module
from serve_app.api.routes import create_app
from serve_app.engine.async_engine import ENGINE_THREAD_NAME
from serve_app.engine.config import EngineConfig
from serve_app.engine.request import SamplingParams
from serve_app.frontend import detokenizer
from serve_app.runtime.factory import build_async_engine
from serve_app.tools.local_client import LocalEngineClient

PROMPT = "Once upon a time there was"
TEXT_METHODS = {
    "decode",
    "batch_decode",
    "encode",
    "encode_plus",
    "tokenize",
    "convert_ids_to_tokens",
    "apply_chat_template",
    "_tokenizer",  # the Rust backend the detokenizer's DecodeStream would step
    "backend_tokenizer",
    "__call__",
}


class TextlessTokenizer:
    """What the router replica's engine gets in place of its tokenizer: the vocabulary facts
    it needs (eos), and an error for anything that makes or reads text."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name: str):
        if name in TEXT_METHODS:
            raise AssertionError(f"the engine used tokenizer.{name}")
        return getattr(self._real, name)


class _TextlessAuto:
    @staticmethod
    def from_pretrained(path, *args, **kwargs):
        from transformers import AutoTokenizer

        return TextlessTokenizer(AutoTokenizer.from_pretrained(path, *args, **kwargs))


async def _text(client: LocalEngineClient, params: SamplingParams) -> list:
    submitted = await client.submit(PROMPT, params, uuid.uuid4().hex)
    outs = [o async for o in submitted.stream]
    assert outs[-1].finished
    choices: dict[int, list] = {}
    for o in outs:
        for c in o.outputs:
            text, ids, finish, stop = choices.get(c.index, ("", [], None, None))
            choices[c.index] = [text + c.text, ids + c.token_ids, c.finish_reason, c.stop_reason]
    return [choices[i] for i in sorted(choices)]


async def test_the_step_thread_makes_no_text_and_a_stop_string_still_ends_the_request(
    qwen3_tiny, monkeypatch
):
    """The engine is built with a tokenizer that raises on any text use; a request with a stop
    string spanning tokens, n = 2 and logprobs completes through the engine path, with the
    detokenizer and the stop-string match run only off the engine's thread."""
    monkeypatch.setattr(parts_module, "AutoTokenizer", _TextlessAuto)
    engine = build_async_engine(
        EngineConfig(model=str(qwen3_tiny), num_kv_blocks=128, max_model_len=512)
    )
    monkeypatch.undo()  # the front end loads the real tokenizer
    threads: list[str] = []
    update = detokenizer.IncrementalDetokenizer.update

    def spy(self, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return update(self, *args, **kwargs)

    monkeypatch.setattr(detokenizer.IncrementalDetokenizer, "update", spy)
    try:
        assert isinstance(engine.engine.grammars._hf_tokenizer, TextlessTokenizer)
        client = LocalEngineClient(engine, "tiny")
        greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
        ((text, ids, _, _),) = await _text(client, greedy)
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        assert len(stop) == 3 and stop.strip()
        params = SamplingParams(
            n=2, temperature=0, max_tokens=24, ignore_eos=True, stop=[stop], logprobs=1
        )
        for got_text, got_ids, finish, stop_reason in await _text(client, params):
            assert (finish, stop_reason) == ("stop", stop)
            assert got_text == text[: text.index(stop)]
            assert got_ids == ids[: len(got_ids)] and len(got_ids) < len(ids)
        assert threads and ENGINE_THREAD_NAME not in threads
        assert all(t == threading.main_thread().name for t in threads)
        for _ in range(200):  # the stopped sequences were aborted in the engine
            s = engine.stats()
            if s.num_running == 0 and s.kv_blocks_used == 0 and engine.num_in_flight == 0:
                break
            await asyncio.sleep(0.02)
        assert engine.stats().num_running == 0 and engine.num_in_flight == 0
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def served(qwen3_tiny):
    engine = build_async_engine(
        EngineConfig(model=str(qwen3_tiny), num_kv_blocks=128, max_model_len=512)
    )
    client = LocalEngineClient(engine, "tiny")
    yield client
    engine.shutdown()


class _CountingEncode:
    def __init__(self, tokenizer, monkeypatch):
        self.calls = 0
        real = tokenizer.encode

        def encode(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(tokenizer, "encode", encode)


async def _post(client: LocalEngineClient, path: str, body: dict) -> httpx.Response:
    app = create_app(client, api_keys=frozenset())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        return await c.post(f"/v1/{path}", json=body, timeout=60)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "prompt, n, encodes",
    [(PROMPT, 1, 1), (PROMPT, 3, 1), ([PROMPT, "The river bends"], 2, 2), ([1, 2, 3], 1, 0)],
)
async def test_a_string_prompt_is_tokenized_exactly_once_per_request(
    served, monkeypatch, stream, prompt, n, encodes
):
    """Completions: once per string prompt, whatever n (the fan-out shares the ids) and
    whether the multi-prompt check runs; token ids are not tokenized at all."""
    counter = _CountingEncode(served.tokenizer, monkeypatch)
    body = {"prompt": prompt, "max_tokens": 4, "n": n, "stream": stream, "stop": ["zz"]}
    r = await _post(served, "completions", body)
    assert r.status_code == 200, r.text
    assert counter.calls == encodes


async def test_a_chat_request_is_tokenized_once(served, monkeypatch):
    counter = _CountingEncode(served.tokenizer, monkeypatch)
    body = {"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 4}
    r = await _post(served, "chat/completions", body)
    assert r.status_code == 200, r.text
    assert counter.calls == 1
