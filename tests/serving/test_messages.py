"""The typed messages between deployments: read by attribute, immutable, and whole after the
trip through a Ray call (pickled by Ray; none of them is a dict or a positional list)."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from serve_app.engine.errors import EngineOverloadedError, InvalidRequestError
from serve_app.experts.balancer import Versioned
from serve_app.experts.placement import place_experts
from serve_app.messages import PlacementReport, Refused, RouterInfo

INFO = RouterInfo(
    max_model_len=512,
    expert_parallel_size=2,
    node_id="node",
    digest="abc",
    routing="prefix_affinity",
    block_size=16,
    prefix_hash_seed=0,
    route_key_blocks=64,
)


@pytest.mark.parametrize(
    "message",
    [
        INFO,
        Refused(EngineOverloadedError("too many requests waiting")),
        PlacementReport("r1", (5, 0, 1), Versioned(3, place_experts(3, 2)), (None, None)),
    ],
)
def test_messages_are_frozen_slots_dataclasses_that_survive_pickling(message):
    cls = type(message)
    assert dataclasses.is_dataclass(cls) and "__slots__" in cls.__dict__
    fields = dataclasses.fields(cls)
    if fields:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(message, fields[0].name, None)
    back = pickle.loads(pickle.dumps(message))
    assert type(back) is cls
    if not isinstance(message, Refused):  # exceptions compare by identity
        assert back == message


def test_a_refusal_keeps_its_error_type_and_param():
    back = pickle.loads(pickle.dumps(Refused(InvalidRequestError("too long", "max_tokens"))))
    assert isinstance(back.error, InvalidRequestError)
    assert (str(back.error), back.error.param) == ("too long", "max_tokens")


def test_a_placement_report_carries_the_placement_itself():
    placement = place_experts(8, 2)
    report = PlacementReport("r1", (1,) * 8, Versioned(0, placement), (None, None))
    assert report.used.placement == placement and report.used.generation == 0
