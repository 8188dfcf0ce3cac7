"""The serving benchmark's client: streaming /v1/completions under a concurrency cap, one
RequestRecord per request, and the percentile summary of a pass.

Timing follows `vllm bench serve` (PEERS.md): TTFT at the first chunk with non-empty choices,
ITL between successive such chunks, TPOT = (latency - TTFT) / (completion_tokens - 1), and
completion_tokens from the final usage chunk. Everything except send_request and run_pass is
pure: timestamps come in as arguments, so the math is tested on synthetic timings.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import NamedTuple

import aiohttp  # a dependency of ray[serve], so always installed with moeserve

HTTP_TIMEOUT_S = 6 * 3600  # a pass is bounded by the caller, not by a per-request clock


@dataclass(slots=True)
class RequestRecord:
    """One request as the client saw it. Times are seconds; start_s is since the pass began.

    usage_reported is False when the server sent no usage chunk: completion_tokens was then
    counted from content chunks, which is wrong whenever a chunk carries several tokens.
    """

    ok: bool
    status: int  # HTTP status; 0 when no response arrived (connection refused, reset)
    error: str | None
    start_s: float
    latency_s: float
    ttft_s: float | None
    itl_s: list[float]
    completion_tokens: int
    prompt_tokens: int | None
    usage_reported: bool

    @property
    def tpot_s(self) -> float | None:
        return tpot(self.latency_s, self.ttft_s, self.completion_tokens)

    def to_json(self) -> dict:
        d = asdict(self)
        d["itl_s"] = [round(x, 6) for x in self.itl_s]
        return d


def tpot(latency_s: float, ttft_s: float | None, completion_tokens: int) -> float | None:
    """Time per output token after the first; None when it is undefined (fewer than 2 tokens)."""
    if ttft_s is None or completion_tokens < 2:
        return None
    return (latency_s - ttft_s) / (completion_tokens - 1)


class StreamRecorder:
    """Turns one response's SSE payloads, each with its arrival time, into a RequestRecord."""

    def __init__(self, start: float, start_s: float = 0.0) -> None:
        self.start, self.start_s = start, start_s
        self.ttft_s: float | None = None
        self.itl_s: list[float] = []
        self.chunks = 0
        self.usage: dict | None = None
        self.error: str | None = None
        self._last = start

    def on_payload(self, t: float, data: dict) -> None:
        if "error" in data:  # in-band: the server had already sent 200 and its headers
            self.error = error_message(data)
        if data.get("choices"):
            if self.ttft_s is None:
                self.ttft_s = t - self.start
            else:
                self.itl_s.append(t - self._last)
            self._last = t
            self.chunks += 1
        if data.get("usage"):
            self.usage = data["usage"]

    def finish(self, t: float, status: int) -> RequestRecord:
        tokens = self.usage.get("completion_tokens") if self.usage else None
        error = self.error
        if error is None and self.chunks == 0:
            error = "stream ended without any token"
        return RequestRecord(
            ok=error is None,
            status=status,
            error=error,
            start_s=self.start_s,
            latency_s=t - self.start,
            ttft_s=self.ttft_s,
            itl_s=self.itl_s,
            completion_tokens=self.chunks if tokens is None else int(tokens),
            prompt_tokens=self.usage.get("prompt_tokens") if self.usage else None,
            usage_reported=tokens is not None,
        )

    def fail(self, t: float, status: int, error: str) -> RequestRecord:
        self.error = error
        return self.finish(t, status)


def sse_data(line: bytes | str) -> str | None:
    """The payload of an SSE `data:` line; None for blank lines, comments and other fields."""
    text = line.decode() if isinstance(line, bytes) else line
    text = text.strip()
    if not text.startswith("data:"):
        return None
    return text[len("data:") :].strip()


def error_message(body: dict | str) -> str:
    """OpenAI's {"error": {"message": ...}} (or any JSON/text body) as one short line."""
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError:
            return body.strip()[:200] or "empty response"
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict) and err.get("message"):
        return str(err["message"])[:200]
    return json.dumps(body)[:200]


def completion_body(model: str, prompt: str | list[int], max_tokens: int) -> dict:
    """What `vllm bench serve --backend openai` sends (PEERS.md), greedy as it defaults to."""
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "logprobs": None,
        "repetition_penalty": 1.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


@dataclass(frozen=True, slots=True)
class Endpoint:
    base_url: str  # without /v1
    model: str
    api_key: str | None = None

    def headers(self) -> dict[str, str]:
        h = {"x-request-id": uuid.uuid4().hex}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h


async def send_request(
    session: aiohttp.ClientSession,
    endpoint: Endpoint,
    prompt: str | list[int],
    max_tokens: int,
    pass_start: float,
) -> RequestRecord:
    start = time.perf_counter()
    rec = StreamRecorder(start, start - pass_start)
    url = endpoint.base_url.rstrip("/") + "/v1/completions"
    body = completion_body(endpoint.model, prompt, max_tokens)
    status = 0
    try:
        async with session.post(url, json=body, headers=endpoint.headers()) as resp:
            status = resp.status
            if status != 200:
                return rec.fail(time.perf_counter(), status, error_message(await resp.text()))
            async for line in resp.content:
                data = sse_data(line)
                if not data:
                    continue
                if data == "[DONE]":
                    break
                rec.on_payload(time.perf_counter(), json.loads(data))
            return rec.finish(time.perf_counter(), status)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
        return rec.fail(time.perf_counter(), status, f"{type(e).__name__}: {e}")


class PassResult(NamedTuple):
    records: list[RequestRecord]  # in prompt order
    duration_s: float  # first send to last response


async def run_pass(
    endpoint: Endpoint,
    prompts: Sequence[str | list[int]],
    max_tokens: int,
    concurrency: int,
    models: Sequence[str | None] | None = None,
) -> PassResult:
    """Send every prompt, never more than `concurrency` in flight (all queued at once, as
    `vllm bench serve --max-concurrency C` does with an infinite request rate). A prompt is
    text or token ids; models[i] (a LoRA adapter's name), when given and not None, is prompt
    i's `model` instead of the endpoint's."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if models is not None and len(models) != len(prompts):
        raise ValueError(f"{len(models)} models for {len(prompts)} prompts")
    targets = [
        replace(endpoint, model=m) if m else endpoint for m in (models or [None] * len(prompts))
    ]
    gate = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = time.perf_counter()

        async def one(target: Endpoint, prompt: str | list[int]) -> RequestRecord:
            async with gate:
                return await send_request(session, target, prompt, max_tokens, t0)

        records = await asyncio.gather(*(one(e, p) for e, p in zip(targets, prompts, strict=True)))
        return PassResult(list(records), time.perf_counter() - t0)


# --- summary -------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation between ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class Stats(NamedTuple):
    mean: float
    p50: float
    p90: float
    p99: float


def stats(values: Sequence[float]) -> Stats | None:
    if not values:
        return None
    return Stats(
        sum(values) / len(values),
        percentile(values, 50),
        percentile(values, 90),
        percentile(values, 99),
    )


@dataclass(frozen=True, slots=True)
class PassSummary:
    """One (target, concurrency) pass. Latencies in ms, over successful requests only."""

    concurrency: int
    num_ok: int
    num_failed: int
    duration_s: float
    output_tokens: int
    output_tok_s: float
    request_s: float
    ttft_ms: Stats | None
    tpot_ms: Stats | None
    itl_p99_ms: float | None
    e2e_p50_ms: float | None
    e2e_p99_ms: float | None
    prompt_tokens_mean: float | None  # as the server counted them (usage chunk)
    usage_missing: int  # ok requests whose token count came from counting chunks
    errors: dict[str, int] = field(default_factory=dict)  # message -> count

    def to_json(self) -> dict:
        d = asdict(self)
        for name in ("ttft_ms", "tpot_ms"):
            s = getattr(self, name)
            d[name] = None if s is None else s._asdict()
        return d


def summarize(records: Sequence[RequestRecord], duration_s: float, concurrency: int) -> PassSummary:
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.completion_tokens for r in ok)
    rate = 1 / duration_s if duration_s > 0 else 0.0
    e2e = [r.latency_s * 1e3 for r in ok]
    itl = [x * 1e3 for r in ok for x in r.itl_s]
    tpots = [t * 1e3 for r in ok if (t := r.tpot_s) is not None]
    prompt = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    return PassSummary(
        concurrency=concurrency,
        num_ok=len(ok),
        num_failed=len(records) - len(ok),
        duration_s=duration_s,
        output_tokens=out_tokens,
        output_tok_s=out_tokens * rate,
        request_s=len(ok) * rate,
        ttft_ms=stats([r.ttft_s * 1e3 for r in ok if r.ttft_s is not None]),
        tpot_ms=stats(tpots),
        itl_p99_ms=percentile(itl, 99) if itl else None,
        e2e_p50_ms=percentile(e2e, 50) if e2e else None,
        e2e_p99_ms=percentile(e2e, 99) if e2e else None,
        prompt_tokens_mean=sum(prompt) / len(prompt) if prompt else None,
        usage_missing=sum(not r.usage_reported for r in ok),
        errors=dict(Counter(f"{r.status}: {r.error}" for r in records if not r.ok)),
    )
