"""The router <-> expert-shard byte payloads: exact round trips (with the rows' LoRA adapters
too), and clear errors on bad ones."""

from __future__ import annotations

import numpy as np
import pytest

from serve_app.experts.wire import (
    AdapterTag,
    LoraRows,
    decode_call,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)


def _request(t: int, d: int = 8, k: int = 2):
    g = np.random.default_rng(t)
    x = g.standard_normal((t, d)).astype(np.float32)
    ids = g.integers(-1, 64, (t, k)).astype(np.int64)  # -1: a slot another shard serves
    w = g.random((t, k)).astype(np.float32)
    return x, ids, w


@pytest.mark.parametrize("t", [0, 1, 37])
def test_request_round_trip_is_exact(t):
    x, ids, w = _request(t)
    x2, ids2, w2 = decode_request(encode_request(x, ids, w))
    assert x2.dtype == np.float32 and ids2.dtype == np.int64 and w2.dtype == np.float32
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(ids2, ids)
    np.testing.assert_array_equal(w2, w)


def test_request_accepts_non_contiguous_and_other_dtypes():
    x, ids, w = _request(6, d=16)
    x2, ids2, w2 = decode_request(
        encode_request(x[:, ::2], ids.astype(np.int32), w.astype(np.float64))
    )
    np.testing.assert_array_equal(x2, x[:, ::2])
    np.testing.assert_array_equal(ids2, ids)
    np.testing.assert_array_equal(w2, w.astype(np.float32))


def test_response_round_trip_is_exact():
    y = np.arange(24, dtype=np.float32).reshape(3, 8) - 5.5
    np.testing.assert_array_equal(decode_response(encode_response(y)), y)


def test_request_shapes_must_agree():
    x, ids, w = _request(4)
    with pytest.raises(ValueError, match="shape mismatch"):
        encode_request(x, ids[:3], w)


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda b: b[:10], "too short"),
        (lambda b: b"XXXX" + b[4:], "magic"),
        (lambda b: b[:-4], "bytes, expected"),
        (lambda b: b + b"\0", "bytes, expected"),
    ],
)
def test_malformed_requests_are_refused(mangle, message):
    payload = encode_request(*_request(3))
    with pytest.raises(ValueError, match=message):
        decode_request(mangle(payload))


def test_a_response_is_not_a_request():
    with pytest.raises(ValueError, match="magic"):
        decode_request(encode_response(np.zeros((2, 8), np.float32)))
    with pytest.raises(ValueError, match="magic"):
        decode_response(encode_request(*_request(2)))


def _lora(t: int) -> LoraRows:
    tags = (AdapterTag("all", "/adapters/all", "ab" * 16), AdapterTag("é3d", "/a/3d", "cd" * 16))
    return LoraRows(np.array([(i % 3) - 1 for i in range(t)]), tags)


@pytest.mark.parametrize("t", [0, 1, 37])
def test_request_with_lora_rows_round_trip_is_exact(t):
    x, ids, w = _request(t)
    call = decode_call(encode_request(x, ids, w, _lora(t)))
    np.testing.assert_array_equal(call.x, x)
    np.testing.assert_array_equal(call.topk_ids, ids)
    np.testing.assert_array_equal(call.topk_weights, w)
    np.testing.assert_array_equal(call.lora.slots, _lora(t).slots)
    assert call.lora.tags == _lora(t).tags
    assert decode_call(encode_request(x, ids, w)).lora is None


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda b: b[:-3], "LoRA table cut short"),
        (lambda b: b + b"\0", "bytes, expected"),
        (lambda b: b[:60], "under"),
    ],
)
def test_malformed_lora_requests_are_refused(mangle, message):
    payload = encode_request(*_request(3), _lora(3))
    with pytest.raises(ValueError, match=message):
        decode_call(mangle(payload))


def test_lora_slots_must_index_the_table_and_are_never_dropped():
    x, ids, w = _request(2)
    bad = LoraRows(np.array([0, 2]), _lora(2).tags)
    with pytest.raises(ValueError, match="outside the table"):
        decode_call(encode_request(x, ids, w, bad))
    with pytest.raises(ValueError, match="do not match"):
        encode_request(x, ids, w, LoraRows(np.array([0]), _lora(2).tags))
    with pytest.raises(ValueError, match="decode_call"):  # the base-model reader refuses it
        decode_request(encode_request(x, ids, w, _lora(2)))
