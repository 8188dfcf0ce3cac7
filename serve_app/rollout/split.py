"""Sticky traffic assignment: which version serves a request. A pure function.

A request's key is its session key (the OpenAI `user` field, else the `x-session-id` header)
or, without one, its request id. sha256(salt + key) maps it to a bucket in [0, 100), and the
version is the first whose cumulative weight exceeds the bucket, walking the weights in the
order given (RolloutState.weights: candidate first).

NOTE (stickiness): because the candidate comes first, its range is [0, w) and only grows as w
steps up (5 -> 25 -> 50 -> 100). A session on the candidate at 5% is therefore on it at every
later step; only sessions move from stable to the candidate, never back, until a rollback.
Keep the candidate first and keep the salt fixed for a rollout, or sessions will flap.
sha256 and not Python's hash(): the latter is salted per process, and every ingress replica
must place a key the same way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from serve_app.rollout.state import RolloutError

PIN_HEADER = "x-moeserve-version"
SESSION_HEADER = "x-session-id"


def bucket(key: str, salt: str = "") -> float:
    """The key's place in [0, 100): the first 8 bytes of sha256(salt + key), scaled."""
    digest = hashlib.sha256((salt + key).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") * 100.0 / 2**64


def session_key(user: str | None, session_header: str | None) -> str | None:
    """The request's session key: the `user` field, else the x-session-id header, else None."""
    return user or session_header or None


def choose_version(
    weights: Sequence[tuple[str, int]],
    session_key: str | None,
    request_id: str,
    pinned: str | None,
    *,
    salt: str = "",
) -> str:
    """The version that serves this request.

    pinned (the x-moeserve-version header) wins when that version is in `weights`, even at 0%
    (blue-green preview, the retiring version); an unknown pin raises RolloutError.
    """
    if not weights or not any(weight > 0 for _, weight in weights) and pinned is None:
        raise RolloutError(f"no version takes traffic in {list(weights)}")
    if pinned is not None:
        names = [name for name, _ in weights]
        if pinned not in names:
            raise RolloutError(f"unknown version {pinned!r} in {PIN_HEADER}; serving {names}")
        return pinned
    b = bucket(session_key if session_key else request_id, salt)
    total = 0
    for name, weight in weights:
        total += weight
        if b < total:
            return name
    # Weights summing under 100 leave a gap at the top: give it to the last weighted version.
    return next(name for name, weight in reversed(weights) if weight > 0)
