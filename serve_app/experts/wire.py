"""The router <-> expert-shard messages: the body of an expert channel frame each way
(serve_app.experts.channel), one flat buffer, versioned by its magic:

  request  = header "<4sIII" (b"MSX1", T, D, K) | x float32 [T, D] | ids int32 [T, K]
             | weights float32 [T, K]
  response = header "<4sII" (b"MSY1", T, D)     | y float32 [T, D]

Little-endian, C order. An id of -1 marks a slot served by another shard. Decoding checks the
magic and the size against the header: a body of another form is a ValueError, never a guess.
"""

from __future__ import annotations

import struct

import numpy as np

_REQUEST = struct.Struct("<4sIII")
_RESPONSE = struct.Struct("<4sII")
_REQUEST_MAGIC = b"MSX1"
_RESPONSE_MAGIC = b"MSY1"


def encode_request(x: np.ndarray, topk_ids: np.ndarray, topk_weights: np.ndarray) -> bytes:
    """x [T, D] float32, topk_ids [T, K] integer, topk_weights [T, K] float32 -> bytes."""
    t, d, k = _check_shapes(x, topk_ids, topk_weights)
    return b"".join(
        (
            _REQUEST.pack(_REQUEST_MAGIC, t, d, k),
            _le(x, "<f4").tobytes(),
            _le(topk_ids, "<i4").tobytes(),
            _le(topk_weights, "<f4").tobytes(),
        )
    )


def decode_request(payload: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> x [T, D] float32, topk_ids [T, K] int64, topk_weights [T, K] float32 (x and the
    weights are read-only views of `payload`)."""
    t, d, k = _header(payload, _REQUEST, _REQUEST_MAGIC)
    _check_size(payload, _REQUEST.size + 4 * (t * d + 2 * t * k))
    off = _REQUEST.size
    x = np.frombuffer(payload, "<f4", t * d, off).reshape(t, d)
    off += 4 * t * d
    ids = np.frombuffer(payload, "<i4", t * k, off).reshape(t, k).astype(np.int64)
    off += 4 * t * k
    w = np.frombuffer(payload, "<f4", t * k, off).reshape(t, k)
    return x, ids, w


def encode_response(y: np.ndarray) -> bytes:
    t, d = y.shape
    return _RESPONSE.pack(_RESPONSE_MAGIC, t, d) + _le(y, "<f4").tobytes()


def decode_response(payload: bytes) -> np.ndarray:
    """-> y [T, D] float32, a read-only view of `payload`."""
    t, d = _header(payload, _RESPONSE, _RESPONSE_MAGIC)
    _check_size(payload, _RESPONSE.size + 4 * t * d)
    return np.frombuffer(payload, "<f4", t * d, _RESPONSE.size).reshape(t, d)


def _check_shapes(x: np.ndarray, topk_ids: np.ndarray, topk_weights: np.ndarray) -> tuple:
    if x.ndim != 2 or topk_ids.ndim != 2:
        raise ValueError(f"x and topk_ids must be 2-D, got {x.shape} and {topk_ids.shape}")
    t, d = x.shape
    k = topk_ids.shape[1]
    if topk_ids.shape != (t, k) or topk_weights.shape != (t, k):
        raise ValueError(
            f"shape mismatch: x {x.shape}, ids {topk_ids.shape}, weights {topk_weights.shape}"
        )
    return t, d, k


def _le(a: np.ndarray, dtype: str) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=dtype)


def _header(payload: bytes, layout: struct.Struct, magic: bytes) -> tuple[int, ...]:
    if not isinstance(payload, bytes | bytearray | memoryview) or len(payload) < layout.size:
        raise ValueError("malformed expert payload: too short")
    got, *dims = layout.unpack_from(payload)
    if got != magic:
        raise ValueError(f"malformed expert payload: magic {got!r}, expected {magic!r}")
    return tuple(dims)


def _check_size(payload: bytes, expected: int) -> None:
    if len(payload) != expected:
        raise ValueError(f"malformed expert payload: {len(payload)} bytes, expected {expected}")
