"""The serving benchmark's load generator against the in-process API server (tiny model)."""

from __future__ import annotations

from serve_app.bench.load import Endpoint, run_pass, summarize
from tests.api.test_openai_api import KEY, server  # noqa: F401 - the module-scoped fixture


async def test_run_pass_streams_exact_lengths(server) -> None:  # noqa: F811
    url, _ = server
    prompts = ["one two three", "four five", "six", "seven eight nine ten", "eleven"]
    res = await run_pass(Endpoint(url, "tiny", KEY), prompts, max_tokens=5, concurrency=2)
    assert len(res.records) == len(prompts) and res.duration_s > 0
    for r in res.records:
        assert r.ok and r.status == 200 and r.usage_reported
        assert r.completion_tokens == 5 and r.prompt_tokens > 0  # ignore_eos: exact lengths
        assert 0 < r.ttft_s <= r.latency_s and all(x >= 0 for x in r.itl_s)
    s = summarize(res.records, res.duration_s, 2)
    assert s.num_ok == 5 and s.output_tokens == 25 and s.tpot_ms is not None


async def test_run_pass_records_openai_errors(server) -> None:  # noqa: F811
    url, _ = server
    res = await run_pass(Endpoint(url, "nope", KEY), ["hi", "there"], max_tokens=3, concurrency=2)
    assert all(not r.ok and r.status == 404 for r in res.records)
    assert res.records[0].error == "The model `nope` does not exist."
    res = await run_pass(Endpoint(url, "tiny", None), ["hi"], max_tokens=3, concurrency=1)
    assert res.records[0].status == 401 and res.records[0].error == "invalid or missing API key"
