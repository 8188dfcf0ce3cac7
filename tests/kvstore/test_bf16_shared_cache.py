"""bf16 KV blocks (engine.dtype bfloat16 on the CPU) through a real redis-server: one bf16 engine
publishes a prefix, a new bf16 engine loads it and answers as a bf16 engine that computed
everything, raw (16-bit entries: half a float32 entry) and INT8 (dequantized into the bf16
pool); a float32 engine on the same Redis never reads them (another digest, and the codec's
dtype field: tests/kvstore/test_kv_codec.py). K/V (Qwen3-MoE) and MLA latent rows
(DeepSeek-V3)."""

from __future__ import annotations

import pytest
import torch

from serve_app.engine.request import SamplingParams
from serve_app.kvstore.codec import HEADER_SIZE
from serve_app.kvstore.settings import KVStoreConfig
from serve_app.model.config import load_model_spec
from serve_app.runtime.llm import LLM
from tests.conftest import tiny_model_dir
from tests.kvstore.test_latent_prefix_cache import _assert_close_until_a_near_tie
from tests.kvstore.test_shared_prefix_cache import BS, LOOKUP_MS, PREFIX, prompt, publish, run

PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=5)


def _engine(model, url: str | None, dtype: str = "bfloat16", **store) -> LLM:
    kv_store = None if url is None else KVStoreConfig(url=url, lookup_timeout_ms=LOOKUP_MS, **store)
    return LLM(str(model), dtype=dtype, num_kv_blocks=96, block_size=BS, max_model_len=512,
               enable_prefix_caching=url is not None, kv_store=kv_store)  # fmt: skip


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("int8", [False, True], ids=["raw", "int8"])
def test_bf16_blocks_load_into_a_new_bf16_engine_and_never_into_a_float32_one(
    arch, int8, redis_server
):
    model = tiny_model_dir(arch)
    spec = load_model_spec(model)
    p = prompt(900 + 2 * int8 + (arch == "deepseek_v3"))
    first = _engine(model, redis_server.url, int8=int8)
    if first.engine.runner.kv_caches[0][0].dtype != torch.bfloat16:
        first.engine.close()
        pytest.skip("no C compiler here: no bf16 weight format, so no bf16 KV pool")
    try:
        publish(first, p)
    finally:
        first.engine.close()  # only Redis keeps the prefix
    query = p + [5, 6]
    again, ref = _engine(model, redis_server.url, int8=int8), _engine(model, None)
    fp32 = _engine(model, redis_server.url, dtype="float32", int8=int8)
    try:
        got, want = run(again, query, PARAMS), run(ref, query, PARAMS)
        assert got.num_cached_tokens == PREFIX
        assert again.engine.stats().prefix_remote_hit_tokens == PREFIX
        if int8:
            _assert_close_until_a_near_tie(got.choices[0], want.choices[0])
        else:  # the very bf16 rows the first engine computed
            assert got.choices[0].token_ids == want.choices[0].token_ids
            for g, w in zip(got.choices[0].logprobs, want.choices[0].logprobs, strict=True):
                assert abs(g.logprob - w.logprob) < 5e-3  # BF16_KV_ATOL (test_bf16_parity.py)
        s = again.engine.stats().kv_store
        values = spec.kv_format.elements_per_token(spec.num_layers) * BS
        scales = spec.num_layers * spec.kv_format.parts * spec.kv_format.heads
        scales *= len(spec.kv_format.segments)
        per_entry = HEADER_SIZE + (values + 4 * scales if int8 else 2 * values)
        assert s.bytes_fetched / s.blocks_fetched == per_entry
        # float32 on the same Redis: a miss, never bf16 bits read as float32
        run(fp32, query, PARAMS)
        assert fp32.engine.stats().prefix_remote_hit_tokens == 0
        assert fp32.engine.model_digest != again.engine.model_digest
    finally:
        for llm in (again, ref, fp32):
            llm.engine.close()
