"""The router <-> expert-shard messages: the body of an expert channel frame each way
(serve_app.experts.channel), one flat buffer, versioned by its magic:

  request  = header "<4sIII" (b"MSX1", T, D, K) | x float32 [T, D] | ids int32 [T, K]
             | weights float32 [T, K]
  request with LoRA rows (some row runs an adapter with expert LoRA in this layer)
           = header "<4sIIII" (b"MSX2", T, D, K, A) | x | ids | weights | slots int32 [T]
             | A table entries, each name, path, digest: every one "<H" length + UTF-8
  response = header "<4sII" (b"MSY1", T, D)     | y float32 [T, D]

Little-endian, C order. An id of -1 marks a slot served by another shard; slots[t] is row t's
entry of the table, -1 for the base model. The table names each adapter as the router holds
it (the shard loads its experts' slices from the path on first sight, and checks the digest).
Decoding checks the magic and the size against the header: a body of another form is a
ValueError, never a guess.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

_REQUEST = struct.Struct("<4sIII")
_LORA_REQUEST = struct.Struct("<4sIIII")
_RESPONSE = struct.Struct("<4sII")
_STR_LEN = struct.Struct("<H")
_REQUEST_MAGIC = b"MSX1"
_LORA_REQUEST_MAGIC = b"MSX2"
_RESPONSE_MAGIC = b"MSY1"


@dataclass(frozen=True, slots=True)
class AdapterTag:
    """An adapter as the router holds it: its name, the PEFT directory it was loaded from
    and the digest of what was loaded there (serve_app.lora.peft_format.LoraAdapter)."""

    name: str
    path: str
    digest: str


@dataclass(frozen=True, slots=True)
class LoraRows:
    """Which adapter each row of an expert call runs: slots[t] indexes `tags`, -1: base."""

    slots: np.ndarray  # [T] int
    tags: tuple[AdapterTag, ...]


class ExpertCall(NamedTuple):
    """A decoded request: x [T, D] float32, topk_ids [T, K] int64, topk_weights [T, K]
    float32 (x and the weights are read-only views of the payload), the rows' adapters."""

    x: np.ndarray
    topk_ids: np.ndarray
    topk_weights: np.ndarray
    lora: LoraRows | None


def encode_request(
    x: np.ndarray, topk_ids: np.ndarray, topk_weights: np.ndarray, lora: LoraRows | None = None
) -> bytes:
    """x [T, D] float32, topk_ids [T, K] integer, topk_weights [T, K] float32, and each row's
    adapter (None: every row runs the base model) -> bytes."""
    t, d, k = _check_shapes(x, topk_ids, topk_weights)
    arrays = [_le(x, "<f4"), _le(topk_ids, "<i4"), _le(topk_weights, "<f4")]
    if lora is None:
        return b"".join([_REQUEST.pack(_REQUEST_MAGIC, t, d, k)] + [a.tobytes() for a in arrays])
    if lora.slots.shape != (t,):
        raise ValueError(f"LoRA slots {lora.slots.shape} do not match {t} rows")
    head = _LORA_REQUEST.pack(_LORA_REQUEST_MAGIC, t, d, k, len(lora.tags))
    table = [_string(s) for tag in lora.tags for s in (tag.name, tag.path, tag.digest)]
    return b"".join([head] + [a.tobytes() for a in arrays] + [_le(lora.slots, "<i4").tobytes()]
                    + table)  # fmt: skip


def decode_call(payload: bytes) -> ExpertCall:
    """A request of either form (see the module docstring)."""
    with_lora = bytes(payload[:4]) == _LORA_REQUEST_MAGIC
    if with_lora:
        t, d, k, a = _header(payload, _LORA_REQUEST, _LORA_REQUEST_MAGIC)
        off = _LORA_REQUEST.size
    else:
        t, d, k = _header(payload, _REQUEST, _REQUEST_MAGIC)
        off = _REQUEST.size
    arrays_end = off + 4 * (t * d + 2 * t * k) + (4 * t if with_lora else 0)
    if not with_lora:
        _check_size(payload, arrays_end)
    elif len(payload) < arrays_end:
        raise ValueError(f"malformed expert payload: {len(payload)} bytes, under {arrays_end}")
    x = np.frombuffer(payload, "<f4", t * d, off).reshape(t, d)
    off += 4 * t * d
    ids = np.frombuffer(payload, "<i4", t * k, off).reshape(t, k).astype(np.int64)
    off += 4 * t * k
    w = np.frombuffer(payload, "<f4", t * k, off).reshape(t, k)
    if not with_lora:
        return ExpertCall(x, ids, w, None)
    slots = np.frombuffer(payload, "<i4", t, arrays_end - 4 * t).astype(np.int64)
    off = arrays_end
    fields = []
    for _ in range(3 * a):
        s, off = _read_string(payload, off)
        fields.append(s)
    _check_size(payload, off)
    tags = tuple(AdapterTag(*fields[i : i + 3]) for i in range(0, len(fields), 3))
    if slots.size and (slots.min() < -1 or slots.max() >= a):
        raise ValueError(f"malformed expert payload: LoRA slots outside the table of {a}")
    return ExpertCall(x, ids, w, LoraRows(slots, tags))


def decode_request(payload: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A base-model request -> x, topk_ids, topk_weights (as ExpertCall's); one with LoRA rows
    is a ValueError here (decode_call reads it): its adapters must never be dropped."""
    call = decode_call(payload)
    if call.lora is not None:
        raise ValueError("expert payload carries LoRA rows: decode it with decode_call")
    return call.x, call.topk_ids, call.topk_weights


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


def _string(s: str) -> bytes:
    raw = s.encode()
    if len(raw) > 0xFFFF:
        raise ValueError(f"adapter field of {len(raw)} bytes is too long for the expert wire")
    return _STR_LEN.pack(len(raw)) + raw


def _read_string(payload: bytes, off: int) -> tuple[str, int]:
    if off + _STR_LEN.size > len(payload):
        raise ValueError("malformed expert payload: LoRA table cut short")
    (n,) = _STR_LEN.unpack_from(payload, off)
    off += _STR_LEN.size
    if off + n > len(payload):
        raise ValueError("malformed expert payload: LoRA table cut short")
    try:
        return bytes(payload[off : off + n]).decode(), off + n
    except UnicodeDecodeError as e:
        raise ValueError(f"malformed expert payload: LoRA table is not UTF-8 ({e})") from None


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
