"""Checks of the streaming contract shared by the in-process API tests and the Serve e2e tests:
a slow SSE reader still gets every token exactly once, in order, with exact usage."""

from __future__ import annotations

import json
import time

import httpx


def read_sse(url: str, body: dict, pause_s: float = 0.0, headers: dict | None = None) -> list:
    """The JSON payloads of a streamed response, read one line at a time with `pause_s`
    between lines (a client that falls behind the engine)."""
    payloads = []
    with httpx.Client(timeout=120) as http:
        with http.stream("POST", url, json=body, headers=headers or {}) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    break
                payloads.append(json.loads(data))
                time.sleep(pause_s)
    return payloads


def tokens_of(payloads: list) -> tuple[list[int], list[str], dict]:
    """(tokens per content chunk, the texts, the usage) of a completion stream with logprobs."""
    counts, texts, usage = [], [], None
    for p in payloads:
        assert "error" not in p, p
        if p.get("usage"):
            usage = p["usage"]
        for c in p["choices"]:
            lps = c.get("logprobs") or {}
            n = len(lps.get("tokens") or [])
            if n or c["text"]:
                counts.append(n)
                texts.append(c["text"])
    return counts, texts, usage


def check_slow_reader(
    base_url: str, model: str, prompt: str, max_tokens: int = 24, headers: dict | None = None
) -> None:
    """Streamed while reading slowly == not streamed: same text, one logprob per token, in
    order, usage exact."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": 1,
    }
    url = f"{base_url}/v1/completions"
    full = httpx.post(url, json=body, headers=headers or {}, timeout=120).json()
    want_text = full["choices"][0]["text"]
    want_tokens = full["choices"][0]["logprobs"]["tokens"]
    stream_body = body | {"stream": True, "stream_options": {"include_usage": True}}
    payloads = read_sse(url, stream_body, pause_s=0.15, headers=headers)
    counts, texts, usage = tokens_of(payloads)
    assert "".join(texts) == want_text
    assert sum(counts) == max_tokens == len(want_tokens)
    got_tokens = [
        t
        for p in payloads
        for c in p["choices"]
        for t in (c.get("logprobs") or {}).get("tokens", [])
    ]
    assert got_tokens == want_tokens  # every token once, in order
    assert usage["completion_tokens"] == max_tokens
    assert usage["prompt_tokens"] == full["usage"]["prompt_tokens"]
