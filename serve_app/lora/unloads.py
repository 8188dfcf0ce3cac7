"""Adapter unloads shared by the router replicas of one version (pure: no Ray, no torch).

An admin unload reaches one router replica (Serve sends a handle call to one). That replica
drops the adapter, and records the unload in the version's log (`UnloadLog`, held by a
deployment-scoped actor: serve_app/deployments/adapter_unloads.py); every replica follows the
log (`UnloadFollower`) every sync interval and drops what it names. An unload is a name and
the revision the ingress's catalog last served it at (`Unload`): it drops that revision and
older ones, never a newer load of the name (a reload after the unload counts up, api/adapters.py).

NOTE: a request routed before the unload may reach a replica after it dropped the adapter and
load it again from its path (requests carry a `LoraRef`): so a follower drops what an unload
names again at every sync for `linger_s` after it learned it (pinned or not, it would otherwise
stay), then keeps it only to know the name was unloaded.

If the log's actor is recreated (a new epoch) it starts empty: each follower posts back every
unload it knows, so a replica that missed one still learns it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Unload:
    """Drop adapter `name` held at `revision` or older."""

    name: str
    revision: int


@dataclass(frozen=True, slots=True)
class UnloadsSince:
    """The log's answer to a follower: the unloads recorded after `seq` (all of them when the
    follower's epoch is not the log's), and the log's epoch and last sequence number."""

    epoch: str
    seq: int
    unloads: tuple[Unload, ...]


class UnloadLog:
    """name -> the highest revision unloaded, and the sequence number it was recorded at."""

    def __init__(self, epoch: str):
        self.epoch = epoch  # a new one per log: a recreated actor is told apart
        self.seq = 0
        self._entries: dict[str, tuple[int, int]] = {}  # name -> (revision, seq)

    def record(self, unloads: Iterable[Unload]) -> int:
        """Record the unloads (an older revision than one recorded changes nothing); returns
        the last sequence number."""
        for u in unloads:
            held = self._entries.get(u.name)
            if held is None or u.revision > held[0]:
                self.seq += 1
                self._entries[u.name] = (u.revision, self.seq)
        return self.seq

    def since(self, epoch: str | None, seq: int) -> UnloadsSince:
        after = seq if epoch == self.epoch else 0
        news = sorted((s, Unload(n, r)) for n, (r, s) in self._entries.items() if s > after)
        return UnloadsSince(self.epoch, self.seq, tuple(u for _, u in news))


@dataclass(frozen=True, slots=True)
class SyncPlan:
    """What a follower does at a sync: post `post` to the log, then read it `since`."""

    post: tuple[Unload, ...]
    epoch: str | None
    seq: int


class UnloadFollower:
    """A router replica's unloads: what it learned (from its own admin calls or the log), when,
    and what the log has not been told yet. The clock is passed in."""

    def __init__(self, linger_s: float = 30.0):
        self.linger_s = linger_s
        self._known: dict[str, tuple[int, float]] = {}  # name -> (revision, learned at)
        self._unposted: dict[str, int] = {}  # name -> revision, not yet in the log
        self.epoch: str | None = None
        self.seq = 0

    def add(self, unload: Unload, now: float, post: bool = True) -> bool:
        """Learn an unload; False when an unload as new was known already."""
        known = self._known.get(unload.name)
        if known is not None and known[0] >= unload.revision:
            return False
        self._known[unload.name] = (unload.revision, now)
        if post:
            self._unposted[unload.name] = unload.revision
        return True

    def plan(self) -> SyncPlan:
        post = tuple(Unload(n, r) for n, r in self._unposted.items())
        return SyncPlan(post, self.epoch, self.seq)

    def posted(self, plan: SyncPlan) -> None:
        """The log took plan.post."""
        for u in plan.post:
            if self._unposted.get(u.name) == u.revision:
                del self._unposted[u.name]

    def merge(self, answer: UnloadsSince, now: float) -> list[Unload]:
        """Take the log's answer; returns the unloads newly learned from it. A log with another
        epoch than the last one seen was recreated (empty): everything known is posted again."""
        if self.epoch is not None and answer.epoch != self.epoch:
            self._unposted = {n: r for n, (r, _) in self._known.items()}
        self.epoch, self.seq = answer.epoch, answer.seq
        return [u for u in answer.unloads if self.add(u, now, post=False)]

    def due(self, now: float) -> list[Unload]:
        """The unloads to enforce at this sync: those learned within linger_s."""
        return [Unload(n, r) for n, (r, t) in self._known.items() if now - t <= self.linger_s]
