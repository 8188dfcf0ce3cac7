"""Benchmark workload generation: pure, seeded, and shaped as specified. No model, no timing."""

from __future__ import annotations

import pytest

from serve_app.bench.workloads import (
    DEFAULT_SPECS,
    DecodeSpec,
    FixedSpec,
    PrefixSpec,
    RandomSpec,
    build_workload,
    fit_to_model_len,
    resolve_specs,
    token_pool,
    with_num_prompts,
)

SPECIAL = (0, 1, 2)
POOL = token_pool(4096, SPECIAL)


def test_token_pool_excludes_special_tokens() -> None:
    assert set(POOL).isdisjoint(SPECIAL)
    assert len(POOL) == 4096 - len(SPECIAL)
    with pytest.raises(ValueError):
        token_pool(2, [0, 1])


@pytest.mark.parametrize("name", sorted(DEFAULT_SPECS))
def test_same_seed_same_workload(name: str) -> None:
    a = build_workload(name, DEFAULT_SPECS[name], POOL)
    b = build_workload(name, DEFAULT_SPECS[name], POOL)
    assert a.requests == b.requests
    assert a.definition == b.definition


def test_different_seed_different_workload() -> None:
    a = build_workload("r", RandomSpec(num_prompts=8, seed=0), POOL)
    b = build_workload("r", RandomSpec(num_prompts=8, seed=1), POOL)
    assert a.requests != b.requests


def test_default_workloads_share_no_leading_tokens() -> None:
    # Otherwise an engine's prefix cache would carry hits from one workload into the next.
    firsts = {
        name: {tuple(r.prompt_token_ids[:16]) for r in build_workload(name, s, POOL).requests}
        for name, s in DEFAULT_SPECS.items()
    }
    names = sorted(firsts)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert firsts[a].isdisjoint(firsts[b]), (a, b)


def test_random_lengths_within_spec_and_varied() -> None:
    spec = RandomSpec()
    w = build_workload("random", spec, POOL)
    assert len(w.requests) == 128
    ins = [len(r.prompt_token_ids) for r in w.requests]
    outs = [r.max_tokens for r in w.requests]
    assert all(64 <= n <= 512 for n in ins)
    assert all(16 <= n <= 256 for n in outs)
    # Variable lengths are the point of this workload.
    assert len(set(ins)) > 32 and len(set(outs)) > 32
    assert all(t in set(POOL) for r in w.requests for t in r.prompt_token_ids)


def test_fixed_lengths_exact() -> None:
    w = build_workload("fixed", FixedSpec(), POOL)
    assert len(w.requests) == 64
    assert {len(r.prompt_token_ids) for r in w.requests} == {128}
    assert {r.max_tokens for r in w.requests} == {64}
    assert w.num_prompt_tokens == 64 * 128 and w.num_output_tokens == 64 * 64


def test_prefix_groups_share_prefix_with_distinct_suffixes() -> None:
    spec = PrefixSpec(num_prefixes=4, prompts_per_prefix=16, prefix_len=1024, suffix_len=64)
    w = build_workload("prefix", spec, POOL)
    assert len(w.requests) == 64
    assert all(len(r.prompt_token_ids) == 1088 and r.max_tokens == 32 for r in w.requests)
    groups = [w.requests[g * 16 : (g + 1) * 16] for g in range(4)]
    prefixes = []
    for group in groups:
        heads = {tuple(r.prompt_token_ids[:1024]) for r in group}
        assert len(heads) == 1  # one shared prefix per group
        suffixes = {tuple(r.prompt_token_ids[1024:]) for r in group}
        assert len(suffixes) == 16  # every prompt its own suffix
        prefixes.append(heads.pop())
    assert len(set(prefixes)) == 4  # and the groups differ


def test_with_num_prompts() -> None:
    assert with_num_prompts(RandomSpec(), 8).num_prompts == 8
    assert with_num_prompts(FixedSpec(), 8).num_prompts == 8
    p = with_num_prompts(PrefixSpec(num_prefixes=4), 8)
    assert (p.num_prefixes, p.prompts_per_prefix, p.num_prompts) == (4, 2, 8)
    assert with_num_prompts(PrefixSpec(num_prefixes=4), 2).prompts_per_prefix == 1
    with pytest.raises(ValueError):
        with_num_prompts(FixedSpec(), 0)


def test_fit_to_model_len_shrinks_only_what_overflows() -> None:
    spec = PrefixSpec(prefix_len=1024, suffix_len=64, output_len=32)
    assert fit_to_model_len(spec, 2048) == spec
    fitted = fit_to_model_len(spec, 512)
    assert fitted.prefix_len == 512 - 64 - 32 and fitted.max_seq_len == 512
    assert fit_to_model_len(RandomSpec(), 700).max_input == 700 - 256
    assert fit_to_model_len(FixedSpec(), 100).input_len == 36
    with pytest.raises(ValueError):
        fit_to_model_len(FixedSpec(), 64)


def test_invalid_specs_raise() -> None:
    with pytest.raises(ValueError):
        RandomSpec(min_input=100, max_input=50)
    with pytest.raises(ValueError):
        FixedSpec(num_prompts=0)
    with pytest.raises(ValueError):
        PrefixSpec(prefix_len=0)
    with pytest.raises(ValueError):
        build_workload("x", FixedSpec(), [])


def test_decode_is_one_row_per_batch_of_exactly_batch_short_prompts() -> None:
    specs = resolve_specs(["fixed", "decode"], 8, decode_batches=[1, 8, 64], decode_output_len=128)
    assert [name for name, _ in specs] == ["fixed", "decode-b1", "decode-b8", "decode-b64"]
    assert specs[0][1].num_prompts == 8  # --num-prompts resizes the others only
    rows = [build_workload(name, spec, POOL) for name, spec in specs[1:]]
    assert [len(w.requests) for w in rows] == [1, 8, 64]
    for w in rows:
        assert w.decode_only and w.definition["kind"] == "DecodeSpec"
        assert all(16 <= len(r.prompt_token_ids) <= 32 for r in w.requests)
        assert all(r.max_tokens == 128 for r in w.requests)
    # distinct seeds per batch: no batch's prompts start like another's
    firsts = [{tuple(r.prompt_token_ids[:8]) for r in w.requests} for w in rows]
    assert firsts[0].isdisjoint(firsts[1]) and firsts[1].isdisjoint(firsts[2])
    assert not build_workload("fixed", specs[0][1], POOL).decode_only


def test_decode_specs_fit_and_validate() -> None:
    assert fit_to_model_len(DecodeSpec(output_len=256), 200).output_len == 200 - 32
    with pytest.raises(ValueError):
        DecodeSpec(output_len=1)  # no token after the first: no decode rate
    with pytest.raises(ValueError):
        resolve_specs(["decode"], decode_batches=[])
    with pytest.raises(ValueError, match="unknown workload"):
        resolve_specs(["nope"])
