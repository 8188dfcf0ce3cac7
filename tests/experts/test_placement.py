"""The pure expert-placement function."""

import pytest

from serve_app.experts.placement import place_experts


def test_contiguous_equal_ranges_without_load():
    p = place_experts(16, 4)
    assert p.shards == ((0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11), (12, 13, 14, 15))
    assert place_experts(8, 3).shards == ((0, 1, 2), (3, 4, 5), (6, 7))
    assert all(len(r) == 1 for r in p.replicas())


def test_load_balancing_without_spare_slots():
    load = [100, 1, 1, 1, 90, 1, 1, 1]
    p = place_experts(8, 2, load)
    assert sorted(e for s in p.shards for e in s) == list(range(8))
    reps = p.replicas()
    assert reps[0] != reps[4]  # the two hot experts land on different shards
    totals = p.shard_load(load)
    assert max(totals) - min(totals) <= 10
    assert p == place_experts(8, 2, load)  # deterministic


def test_hot_expert_is_replicated_on_distinct_shards():
    load = [1000] + [10] * 7
    p = place_experts(8, 4, load, slots_per_shard=3)  # 4 spare slots
    reps = p.replicas()
    assert len(reps[0]) >= 2 and len(set(reps[0])) == len(reps[0])
    assert all(len(s) <= 3 for s in p.shards)
    assert all(reps[e] for e in range(8))  # every expert still placed
    plain = place_experts(8, 4, load)
    assert max(p.shard_load(load)) < max(plain.shard_load(load))


@pytest.mark.parametrize(
    "args",
    [
        (0, 1),
        (4, 0),
        (4, 8),
        (8, 2, None, 3),
        (8, 2, None, 9),
        (4, 2, [1, 2]),
        (4, 2, [1, -1, 1, 1]),
    ],
)
def test_invalid_arguments(args):
    with pytest.raises(ValueError):
        place_experts(*args)
