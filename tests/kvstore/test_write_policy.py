"""Exact-state tests of the shared tier's write policies over block events (no torch, no Redis)."""

from __future__ import annotations

import pytest

from serve_app.kvstore.settings import WRITE_POLICIES, KVStoreConfig
from serve_app.kvstore.write_policy import (
    POLICIES,
    WriteThrough,
    WriteThroughSelective,
    make_write_policy,
)

H = [bytes([i]) * 4 for i in range(8)]


def test_the_settings_name_every_policy_and_the_default_is_one():
    assert WRITE_POLICIES == ("write_through", "write_through_selective") == tuple(POLICIES)
    assert isinstance(make_write_policy(KVStoreConfig().write_policy, False), WriteThrough)
    assert isinstance(make_write_policy("write_through_selective", True), WriteThroughSelective)


def test_write_through_sends_computed_prompt_blocks_once():
    p = WriteThrough(publish_decode=False)
    p.block_computed(0, H[0], holds_output=False)
    p.block_computed(1, H[1], holds_output=True)  # generated tokens: not without publish_decode
    p.block_loaded(2, H[2])  # came from the tier
    p.block_reused(0, H[0])
    p.block_reused(2, H[2])
    assert p.take_writes() == [(0, H[0])]
    assert p.take_writes() == []


def test_write_through_with_publish_decode_sends_generated_blocks():
    p = WriteThrough(publish_decode=True)
    p.block_computed(1, H[1], holds_output=True)
    assert p.take_writes() == [(1, H[1])]


def test_selective_sends_a_block_on_its_first_reuse_only():
    """Nothing at compute time; the block when a later request reuses it (once, however
    often it is hit, whatever it holds); loaded blocks never; an evicted block starts over."""
    p = WriteThroughSelective(publish_decode=False)
    p.block_computed(0, H[0], holds_output=False)
    p.block_computed(1, H[1], holds_output=True)
    assert p.take_writes() == []
    p.block_reused(0, H[0])
    p.block_reused(1, H[1])
    p.block_reused(0, H[0])
    assert p.take_writes() == [(0, H[0]), (1, H[1])]
    p.block_reused(1, H[1])
    p.block_loaded(2, H[2])
    p.block_reused(2, H[2])
    assert p.take_writes() == []
    p.block_evicted(0)  # block 0 now holds other tokens
    p.block_computed(0, H[3], holds_output=False)
    p.block_reused(0, H[3])
    assert p.take_writes() == [(0, H[3])]


@pytest.mark.parametrize("cls", [WriteThrough, WriteThroughSelective])
def test_discard_and_reset_drop_pending_writes(cls):
    p = cls(publish_decode=True)
    p.block_computed(0, H[0], holds_output=False)
    p.block_reused(0, H[0])
    p.discard()  # the step failed
    assert p.take_writes() == []
    p.block_reused(0, H[0])  # once offered, never again while it keeps its hash
    assert p.take_writes() == []
    p.cache_reset()
    p.block_computed(0, H[0], holds_output=False)
    p.block_reused(0, H[0])
    assert p.take_writes() == [(0, H[0])]
