"""The wire format of one KV block in the shared store. Pure: numpy, struct and zlib, no torch.

An entry is a fixed little-endian header followed by the payload:

    magic "MSKV" | version u16 | flags u16 | dtype u8 | pad u8 | layers u16 | block_size u16
    | kv_heads u16 | head_dim u16 | payload_len u64 | crc32(payload) u32 | block hash 32 bytes

Payload, shape letters L layers, 2 (K then V), B block size, H KV heads, D head_dim:
  raw   the cache's own dtype, [L, 2, B, H, D] (bfloat16 travels as its 16-bit pattern);
  int8  float32 scales [L, 2, H], then int8 values [L, 2, B, H, D] (symmetric, one scale per
        (layer, K/V, head)): |x - dequant(x)| <= scale / 2 = amax / 254 per element.

NOTE: nothing here ever unpickles; a header that does not match what the reader expects, a
short payload or a bad checksum raises CodecError, which the caller treats as a miss.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

MAGIC = b"MSKV"
VERSION = 1
FLAG_INT8 = 1
_HEADER = struct.Struct("<4sHHBxHHHHQI32s")
HEADER_SIZE = _HEADER.size

# dtype name -> (code, numpy storage dtype). bfloat16 has no numpy dtype: its bits travel as u16.
_DTYPES = {"float32": (1, np.float32), "bfloat16": (2, np.uint16), "float16": (3, np.float16)}
_CODES = {code: name for name, (code, _) in _DTYPES.items()}


class CodecError(ValueError):
    """An entry that cannot be trusted: wrong magic/version/layout, truncated, bad checksum."""


@dataclass(frozen=True, slots=True)
class KVLayout:
    """What one block holds, as the reader expects it. dtype: float32 | bfloat16 | float16."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"unsupported KV dtype {self.dtype!r}; expected {list(_DTYPES)}")

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def storage_dtype(self) -> np.dtype:
        return np.dtype(_DTYPES[self.dtype][1])

    @property
    def num_elements(self) -> int:
        return int(np.prod(self.shape))


def encode_block(block_hash: bytes, kv: np.ndarray, layout: KVLayout, int8: bool = False) -> bytes:
    """One block's K/V for all layers, kv shaped layout.shape, -> header + payload bytes.

    raw: kv is in layout.storage_dtype. int8: kv is float32 (the caller upcasts bfloat16).
    """
    if kv.shape != layout.shape:
        raise ValueError(f"kv shape {kv.shape} != layout {layout.shape}")
    if int8:
        payload = _quantize(np.asarray(kv, dtype=np.float32))
    else:
        if kv.dtype != layout.storage_dtype:
            raise ValueError(f"kv dtype {kv.dtype} != {layout.storage_dtype} for {layout.dtype}")
        payload = np.ascontiguousarray(kv).tobytes()
    header = _HEADER.pack(
        MAGIC,
        VERSION,
        FLAG_INT8 if int8 else 0,
        _DTYPES[layout.dtype][0],
        layout.num_layers,
        layout.block_size,
        layout.num_kv_heads,
        layout.head_dim,
        len(payload),
        zlib.crc32(payload),
        _check_hash(block_hash),
    )
    return header + payload


def decode_block(
    data: bytes, block_hash: bytes, layout: KVLayout, int8: bool = False
) -> np.ndarray:
    """Validate an entry against the expected hash, layout and format; return [L, 2, B, H, D].

    raw entries come back in layout.storage_dtype (a read-only view of `data`), int8 entries
    dequantized to float32. Raises CodecError on any mismatch.
    """
    if len(data) < HEADER_SIZE:
        raise CodecError(f"truncated header: {len(data)} bytes")
    magic, version, flags, code, layers, bs, heads, dim, size, crc, h = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CodecError("bad magic")
    if version != VERSION:
        raise CodecError(f"unsupported version {version}")
    if h != _check_hash(block_hash):
        raise CodecError("entry belongs to another block hash")
    if (layers, bs, heads, dim) != (
        layout.num_layers,
        layout.block_size,
        layout.num_kv_heads,
        layout.head_dim,
    ) or _CODES.get(code) != layout.dtype:
        raise CodecError(
            f"layout mismatch: L={layers} B={bs} H={heads} D={dim} dtype={_CODES.get(code)}, "
            f"expected {layout}"
        )
    if bool(flags & FLAG_INT8) != int8 or flags & ~FLAG_INT8:
        raise CodecError(f"format flags {flags:#x} do not match int8={int8}")
    payload = memoryview(data)[HEADER_SIZE:]
    expected = _int8_size(layout) if int8 else layout.num_elements * layout.storage_dtype.itemsize
    if size != expected or len(payload) != expected:
        raise CodecError(f"payload is {len(payload)} bytes (header {size}), expected {expected}")
    if zlib.crc32(payload) != crc:
        raise CodecError("checksum mismatch")
    if int8:
        return _dequantize(payload, layout)
    return np.frombuffer(payload, dtype=layout.storage_dtype).reshape(layout.shape)


def _check_hash(block_hash: bytes) -> bytes:
    if len(block_hash) != 32:
        raise ValueError(f"block hash must be 32 bytes, got {len(block_hash)}")
    return block_hash


def _int8_size(layout: KVLayout) -> int:
    return layout.num_layers * 2 * layout.num_kv_heads * 4 + layout.num_elements


def _quantize(kv: np.ndarray) -> bytes:
    # kv [L, 2, B, H, D] -> scales [L, 2, H] over (B, D), values int8 [L, 2, B, H, D]
    amax = np.abs(kv).max(axis=(2, 4))
    scales = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.rint(kv / scales[:, :, None, :, None]).clip(-127, 127).astype(np.int8)
    return scales.tobytes() + q.tobytes()


def _dequantize(payload: memoryview, layout: KVLayout) -> np.ndarray:
    L, _, B, H, D = layout.shape
    n_scales = L * 2 * H
    scales = np.frombuffer(payload[: n_scales * 4], dtype=np.float32).reshape(L, 2, 1, H, 1)
    q = np.frombuffer(payload[n_scales * 4 :], dtype=np.int8).reshape(layout.shape)
    return q.astype(np.float32) * scales
