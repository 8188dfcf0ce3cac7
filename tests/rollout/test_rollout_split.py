"""Sticky traffic assignment: deterministic buckets, stickiness as weights grow, pinning."""

import hashlib

import pytest

from serve_app.rollout.split import bucket, choose_version, session_key
from serve_app.rollout.state import RolloutError

KEYS = [f"user-{i}" for i in range(10_000)]


def split(weight: int) -> tuple[tuple[str, int], ...]:
    return (("v2", weight), ("v1", 100 - weight))


def on_candidate(weight: int, salt: str = "") -> set[str]:
    return {k for k in KEYS if choose_version(split(weight), k, "req", None, salt=salt) == "v2"}


def test_bucket_is_sha256_and_stable():
    digest = hashlib.sha256(b"user-1").digest()
    assert bucket("user-1") == int.from_bytes(digest[:8], "big") * 100.0 / 2**64
    assert all(0 <= bucket(k) < 100 for k in KEYS[:1000])
    assert bucket("user-1", salt="r2") != bucket("user-1")


def test_sessions_on_the_candidate_stay_there_as_weights_grow():
    previous: set[str] = set()
    for weight in (5, 25, 50, 100):
        now = on_candidate(weight)
        assert previous <= now, f"sessions left the candidate at {weight}%"
        # the share is the weight, within 1.5 points over 10,000 keys (binomial sd <= 0.5)
        assert abs(len(now) / len(KEYS) * 100 - weight) < 1.5
        previous = now
    assert len(previous) == len(KEYS)


def test_a_salt_picks_other_early_sessions():
    assert on_candidate(5) != on_candidate(5, salt="rollout-2")


def test_same_key_same_version_and_request_id_without_a_session():
    w = split(50)
    assert {choose_version(w, "alice", f"req-{i}", None) for i in range(50)} == {
        choose_version(w, "alice", "other", None)
    }
    # without a session key each request id is placed on its own: both versions get traffic
    assert {choose_version(w, None, f"req-{i}", None) for i in range(200)} == {"v1", "v2"}
    assert choose_version(w, "", "req-1", None) == choose_version(w, None, "req-1", None)


def test_pinned_version_wins_even_at_zero_weight():
    preview = (("v2", 0), ("v1", 100))
    assert {choose_version(preview, k, "r", None) for k in KEYS[:500]} == {"v1"}
    assert choose_version(preview, "user-1", "r", "v2") == "v2"
    assert choose_version(preview, "user-1", "r", "v1") == "v1"
    with pytest.raises(RolloutError, match="unknown version 'v9' in x-moeserve-version"):
        choose_version(preview, "user-1", "r", "v9")


def test_errors_and_edge_weights():
    with pytest.raises(RolloutError, match="no version takes traffic"):
        choose_version((), "k", "r", None)
    with pytest.raises(RolloutError, match="no version takes traffic"):
        choose_version((("v1", 0),), "k", "r", None)
    assert choose_version((("v1", 0),), "k", "r", "v1") == "v1"
    assert {choose_version((("v2", 100), ("v1", 0)), k, "r", None) for k in KEYS[:500]} == {"v2"}


def test_session_key_prefers_the_user_field():
    assert session_key("alice", "sess-1") == "alice"
    assert session_key(None, "sess-1") == "sess-1"
    assert session_key("", None) is None
