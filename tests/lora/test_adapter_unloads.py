"""Adapter unloads across router replicas (serve_app.lora.unloads, pure): the log a version's
replicas share, each replica's follower (what it posts, learns, enforces and for how long),
and a recreated log rebuilt from the followers. Exact state, a hand-driven clock, no Ray."""

from __future__ import annotations

from serve_app.lora.unloads import Unload, UnloadFollower, UnloadLog


def sync(f: UnloadFollower, log: UnloadLog, now: float) -> list[Unload]:
    """What UnloadSync does with the actor: post, read since, merge."""
    plan = f.plan()
    if plan.post:
        log.record(plan.post)
        f.posted(plan)
    return f.merge(log.since(plan.epoch, plan.seq), now)


def test_the_log_hands_out_what_came_after_a_sequence_number():
    log = UnloadLog("e1")
    assert log.record([Unload("a", 0)]) == 1
    assert log.record([Unload("b", 2), Unload("a", 0)]) == 2  # a@0 again: nothing new
    assert log.since(None, 0).unloads == (Unload("a", 0), Unload("b", 2))
    assert log.since("e1", 1).unloads == (Unload("b", 2),)
    assert log.since("e1", 2).unloads == ()
    log.record([Unload("a", 5), Unload("b", 1)])  # b@1 is older than b@2: ignored
    got = log.since("e1", 2)
    assert (got.epoch, got.seq, got.unloads) == ("e1", 3, (Unload("a", 5),))
    assert log.since("other", 3).unloads == (Unload("b", 2), Unload("a", 5))  # another epoch


def test_one_replicas_unload_reaches_the_others_at_their_next_sync():
    log = UnloadLog("e1")
    took, other, late = UnloadFollower(), UnloadFollower(), UnloadFollower()
    for f in (took, other):
        assert sync(f, log, 0.0) == []
    took.add(Unload("a", 3), now=1.0)
    assert took.plan().post == (Unload("a", 3),)
    assert sync(took, log, 1.0) == []  # it knew it; the log now has it
    assert took.plan().post == ()
    assert sync(other, log, 1.5) == [Unload("a", 3)]
    assert sync(other, log, 2.5) == []  # learned once
    assert sync(late, log, 9.0) == [Unload("a", 3)]  # a replica that started later
    assert other.plan().post == ()  # what it learned from the log is not posted back


def test_an_unload_is_enforced_for_linger_s_then_only_remembered():
    f = UnloadFollower(linger_s=30.0)
    f.add(Unload("a", 3), now=100.0)
    assert f.due(100.0) == f.due(130.0) == [Unload("a", 3)]
    assert f.due(130.5) == []
    assert not f.add(Unload("a", 2), now=131.0)  # older: known already
    assert f.due(131.0) == []
    assert f.add(Unload("a", 4), now=131.0)  # a newer revision unloaded: enforced again
    assert f.due(131.0) == [Unload("a", 4)]


def test_a_post_the_log_did_not_take_is_sent_again():
    f = UnloadFollower()
    f.add(Unload("a", 0), now=0.0)
    plan = f.plan()  # the call fails: posted() is not called
    assert f.plan() == plan
    f.add(Unload("b", 1), now=0.5)
    later = f.plan()
    assert later.post == (Unload("a", 0), Unload("b", 1))
    f.posted(plan)  # a late answer to the first post leaves b to send
    assert f.plan().post == (Unload("b", 1),)


def test_a_recreated_log_is_rebuilt_from_the_followers():
    first = UnloadLog("e1")
    a, b = UnloadFollower(), UnloadFollower()
    a.add(Unload("x", 1), now=0.0)
    sync(a, first, 0.0)
    sync(b, first, 0.0)
    second = UnloadLog("e2")  # the actor died and came back empty
    assert sync(a, second, 5.0) == []
    assert a.plan().post == (Unload("x", 1),)  # its new epoch: everything known goes back
    sync(a, second, 6.0)
    fresh = UnloadFollower()
    assert sync(fresh, second, 7.0) == [Unload("x", 1)]
