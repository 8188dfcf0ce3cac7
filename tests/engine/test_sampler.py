"""Sampler semantics on random logits and hand-built requests: no model, no Ray."""

from __future__ import annotations

import math

import pytest
import torch

from serve_app.engine.request import Request, SamplingParams
from serve_app.engine.sampler import Sampler, apply_min_tokens, apply_penalties

VOCAB = 32
EOS = 0


def req(
    rid: str = "r",
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    **params: object,
) -> Request:
    r = Request(rid, prompt or [1, 2, 3], SamplingParams(**params), eos_token_ids=frozenset({EOS}))
    for t in output or []:
        r.append_output_token(t)
    return r


def logits_for(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.fixture
def sampler() -> Sampler:
    return Sampler()


def test_greedy_is_argmax(sampler: Sampler) -> None:
    logits = logits_for(8)
    out = sampler(logits, [req(str(i), temperature=0.0) for i in range(8)])
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits(sampler: Sampler, dtype: torch.dtype) -> None:
    logits = logits_for(4).to(dtype)
    reqs = [req("a", temperature=0.0), req("b", temperature=0.7), req("c", temperature=0.0)]
    out = sampler(logits, [*reqs, req("d", temperature=0.0, logprobs=2)])
    expected = logits.float().argmax(-1).tolist()
    assert [out.token_ids[i] for i in (0, 2, 3)] == [expected[i] for i in (0, 2, 3)]
    assert out.logprobs[3] is not None and math.isfinite(out.logprobs[3].logprob)


def test_greedy_hot_path_skips_general_path(sampler: Sampler, monkeypatch) -> None:
    def boom(*args: object) -> None:
        raise AssertionError("all-greedy batch left the hot path")

    monkeypatch.setattr(Sampler, "_sample_general", boom)
    # min_tokens already satisfied: still plain greedy.
    reqs = [req("a", temperature=0.0), req("b", temperature=0.0, min_tokens=1, output=[5])]
    logits = logits_for(2)
    assert sampler(logits, reqs).token_ids == logits.argmax(-1).tolist()


def test_logits_are_not_modified(sampler: Sampler) -> None:
    logits = logits_for(3)
    before = logits.clone()
    reqs = [
        req("a", temperature=0.8, top_k=5, top_p=0.9, min_p=0.1),
        req("b", temperature=0.0, repetition_penalty=1.5, output=[4, 4]),
        req("c", temperature=1.0, min_tokens=3, logprobs=3),
    ]
    sampler(logits, reqs)
    assert torch.equal(logits, before)


def test_mixed_batch_greedy_rows_stay_argmax(sampler: Sampler) -> None:
    logits = logits_for(6, seed=3)
    reqs = [req(str(i), temperature=0.0 if i % 2 else 1.0) for i in range(6)]
    out = sampler(logits, reqs)
    argmax = logits.argmax(-1).tolist()
    assert [out.token_ids[i] for i in (1, 3, 5)] == [argmax[i] for i in (1, 3, 5)]


def _run_seeded(order: list[str], steps: int = 6) -> dict[str, list[int]]:
    """Samples `steps` tokens for each request; each request's logits depend only on its name."""
    sampler = Sampler()
    reqs = {
        "s42": req("s42", temperature=1.0, seed=42),
        "s7": req("s7", temperature=0.9, seed=7, top_k=10),
        "free": req("free", temperature=1.0),
        "greedy": req("greedy", temperature=0.0),
    }
    names = sorted(reqs)
    batch = [reqs[name] for name in order]
    for step in range(steps):
        # Flat enough (std ~1) that the draws really depend on the seed.
        rows = [logits_for(1, seed=100 * step + names.index(r.request_id))[0] for r in batch]
        logits = torch.stack(rows) * 0.3
        out = sampler(logits, batch)
        for r, t in zip(batch, out.token_ids, strict=True):
            r.append_output_token(t)
    return {name: r.output_token_ids for name, r in reqs.items() if name in order}


def test_seed_is_reproducible_regardless_of_batch() -> None:
    alone = _run_seeded(["s42"])
    mixed = _run_seeded(["free", "s42", "greedy", "s7"])
    reordered = _run_seeded(["s7", "greedy", "s42", "free"])
    assert alone["s42"] == mixed["s42"] == reordered["s42"]
    assert mixed["s7"] == reordered["s7"]


def test_request_state_lives_in_the_sampler_until_release(sampler: Sampler) -> None:
    seeded = req("a", temperature=1.0, seed=3)
    first = sampler(logits_for(1) * 0.3, [seeded]).token_ids
    assert len(sampler.states) == 1 and not hasattr(seeded, "sampler_state")
    sampler.states.release([seeded])
    assert len(sampler.states) == 0
    # a fresh generator with the same seed: the same first draw again
    assert sampler(logits_for(1) * 0.3, [req("a", temperature=1.0, seed=3)]).token_ids == first


def test_different_seeds_differ(sampler: Sampler) -> None:
    logits = torch.zeros(1, VOCAB)  # uniform: 20 draws of two seeds coincide w.p. 32**-20
    a, b = req("a", seed=1), req("b", seed=2)
    ta = [sampler(logits, [a]).token_ids[0] for _ in range(20)]
    tb = [sampler(logits, [b]).token_ids[0] for _ in range(20)]
    assert ta != tb


def test_top_k_1_is_greedy(sampler: Sampler) -> None:
    logits = logits_for(16, seed=5)
    out = sampler(logits, [req(str(i), temperature=1.5, top_k=1) for i in range(16)])
    assert out.token_ids == logits.argmax(-1).tolist()


def test_tiny_top_p_is_argmax(sampler: Sampler) -> None:
    logits = logits_for(16, seed=6)
    out = sampler(logits, [req(str(i), temperature=1.0, top_p=1e-6) for i in range(16)])
    assert out.token_ids == logits.argmax(-1).tolist()


def test_top_k_restricts_support(sampler: Sampler) -> None:
    row = logits_for(1, seed=8)[0] * 0.2
    n = 2000
    out = sampler(row.expand(n, VOCAB), [req(str(i), top_k=3) for i in range(n)])
    assert set(out.token_ids) == set(row.topk(3).indices.tolist())


def test_min_p_restricts_support(sampler: Sampler) -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    row = torch.full((VOCAB,), -math.inf)
    row[:4] = probs.log()
    n = 4000
    out = sampler(row.expand(n, VOCAB), [req(str(i), min_p=0.5) for i in range(n)])
    # 0.3 >= 0.5 * 0.5 survives, 0.15 does not.
    assert set(out.token_ids) == {0, 1}


def test_random_sampling_matches_distribution(sampler: Sampler) -> None:
    probs = torch.tensor([0.1, 0.2, 0.7])
    row = torch.full((VOCAB,), -math.inf)
    row[:3] = probs.log()
    n = 10_000
    torch.manual_seed(0)
    out = sampler(row.expand(n, VOCAB), [req(str(i)) for i in range(n)])
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=3)[:3].float() / n
    assert torch.allclose(freq, probs, atol=0.02)


def test_penalties_exact_numbers() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0, 1.0], [2.0, -1.0, 0.5, 3.0, 0.0, 1.0]])
    penalised = req(
        "p",
        prompt=[0],
        output=[1, 2, 2],
        repetition_penalty=2.0,
        frequency_penalty=0.5,
        presence_penalty=0.25,
    )
    plain = req("q", prompt=[0], output=[1, 2, 2])
    apply_penalties(logits, [penalised, plain])
    # 0: prompt only, positive -> /2.  1: out x1, negative -> *2, -0.5, -0.25.
    # 2: out x2, positive -> /2, -1.0, -0.25.  3..5: untouched.
    assert logits[0].tolist() == [1.0, -2.75, -1.0, 3.0, 0.0, 1.0]
    assert logits[1].tolist() == [2.0, -1.0, 0.5, 3.0, 0.0, 1.0]


def test_repetition_penalty_below_one_rewards() -> None:
    logits = torch.tensor([[1.0, -1.0, 1.0]])
    apply_penalties(logits, [req(prompt=[0, 1], repetition_penalty=0.5)])
    assert logits[0].tolist() == [2.0, -0.5, 1.0]


def test_penalties_without_output_tokens() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    apply_penalties(logits, [req(prompt=[2], frequency_penalty=1.0, presence_penalty=1.0)])
    assert logits[0].tolist() == [1.0, 2.0, 3.0]  # freq/presence only look at the output


def test_penalty_changes_greedy_choice(sampler: Sampler) -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 7], logits[0, 9] = 2.0, 1.5
    r = req(temperature=0.0, output=[7], presence_penalty=1.0)
    assert sampler(logits, [r]).token_ids == [9]


def test_min_tokens_blocks_eos_and_stop_tokens(sampler: Sampler) -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS], logits[0, 5], logits[0, 6] = 10.0, 9.0, 8.0
    r = req(temperature=0.0, min_tokens=2, stop_token_ids=[5])
    assert sampler(logits, [r]).token_ids == [6]
    r.append_output_token(6)
    assert sampler(logits, [r]).token_ids == [6]
    r.append_output_token(6)
    assert sampler(logits, [r]).token_ids == [EOS]  # min_tokens reached


def test_min_tokens_with_ignore_eos_masks_only_stop_tokens() -> None:
    logits = torch.zeros(2, 8)
    apply_min_tokens(
        logits,
        [req("a", min_tokens=1, ignore_eos=True, stop_token_ids=[3]), req("b", min_tokens=1)],
    )
    assert logits[0].isinf().nonzero().flatten().tolist() == [3]
    assert logits[1].isinf().nonzero().flatten().tolist() == [EOS]


def test_logprobs_are_raw(sampler: Sampler) -> None:
    logits = logits_for(3, seed=11)
    reqs = [
        req("a", temperature=0.7, top_k=4, logprobs=5, repetition_penalty=1.3, output=[1]),
        req("b", temperature=0.0, logprobs=0),
        req("c", temperature=1.0),
    ]
    out = sampler(logits, reqs)
    ref = torch.log_softmax(logits, dim=-1)
    for i in (0, 1):
        lp = out.logprobs[i]
        assert lp is not None and lp.token_id == out.token_ids[i]
        assert lp.logprob == pytest.approx(ref[i, lp.token_id].item(), abs=1e-5)
    assert out.logprobs[2] is None

    top = out.logprobs[0].top
    assert [t for t, _ in top] == ref[0].topk(5).indices.tolist()
    values = [v for _, v in top]
    assert values == sorted(values, reverse=True)
    assert sum(math.exp(v) for v in values) <= 1.0 + 1e-6
    assert out.logprobs[1].top == ()


def test_logprobs_full_distribution_normalised(sampler: Sampler) -> None:
    vocab = SamplingParams.MAX_LOGPROBS
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(3)) * 4
    out = sampler(logits, [req("a", logprobs=vocab), req("b", temperature=0.0, logprobs=vocab)])
    for lp in out.logprobs:
        assert lp is not None and len(lp.top) == vocab
        total = torch.logsumexp(torch.tensor([v for _, v in lp.top]), dim=0)
        assert total.item() == pytest.approx(0.0, abs=1e-5)


def test_tiny_temperature_does_not_nan(sampler: Sampler) -> None:
    logits = logits_for(4, seed=12) * 100
    out = sampler(logits, [req(str(i), temperature=1e-6) for i in range(4)])
    assert out.token_ids == logits.argmax(-1).tolist()


def test_empty_batch_and_shape_mismatch(sampler: Sampler) -> None:
    assert sampler(torch.zeros(0, VOCAB), []).token_ids == []
    with pytest.raises(ValueError):
        sampler(torch.zeros(2, VOCAB), [req()])
