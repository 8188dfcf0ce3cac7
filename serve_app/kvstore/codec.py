"""The wire format of one KV block in the shared store. Pure: numpy, struct and zlib, no torch.

An entry is a fixed little-endian header followed by the payload:

    magic "MSKV" | version u16 | flags u16 | dtype u8 | parts u8 | layers u16 | block_size u16
    | kv_heads u16 | head_dim u16 | first segment u16 | payload_len u64 | crc32(payload) u32
    | block hash 32 bytes

Payload, shape letters L layers, P parts (2: K then V; 1: an MLA latent row), B block size,
H KV heads (rows per part), D floats per row, S segments of D (serve_app/model/kv_format.py):
  raw   the cache's own dtype, [L, P, B, H, D] (bfloat16 travels as its 16-bit pattern);
  int8  float32 scales [L, P, H, S], then int8 values [L, P, B, H, D] (symmetric, one scale per
        (layer, part, head, segment): MLA's latent and rope key have their own):
        |x - dequant(x)| <= scale / 2 = amax / 254 per element.
The header names the layout, so an entry of one format never decodes as another.

NOTE: nothing here ever unpickles; a header that does not match what the reader expects, a
short payload or a bad checksum raises CodecError, which the caller treats as a miss.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

MAGIC = b"MSKV"
VERSION = 2
FLAG_INT8 = 1
_HEADER = struct.Struct("<4sHHBBHHHHHQI32s")
HEADER_SIZE = _HEADER.size

# dtype name -> (code, numpy storage dtype). bfloat16 has no numpy dtype: its bits travel as u16.
_DTYPES = {"float32": (1, np.float32), "bfloat16": (2, np.uint16), "float16": (3, np.float16)}
_CODES = {code: name for name, (code, _) in _DTYPES.items()}


class CodecError(ValueError):
    """An entry that cannot be trusted: wrong magic/version/layout, truncated, bad checksum."""


@dataclass(frozen=True, slots=True)
class KVLayout:
    """What one block holds, as the reader expects it. dtype: float32 | bfloat16 | float16.
    segments: the INT8 scale groups along head_dim (empty: one, the whole row)."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    parts: int = 2
    segments: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"unsupported KV dtype {self.dtype!r}; expected {list(_DTYPES)}")
        if self.parts not in (1, 2):
            raise ValueError(f"parts must be 1 or 2, got {self.parts}")
        if len(self.row_segments) > 2 or sum(self.row_segments) != self.head_dim:
            raise ValueError(f"segments {self.segments} must be 1 or 2 summing to {self.head_dim}")

    @property
    def row_segments(self) -> tuple[int, ...]:
        return self.segments or (self.head_dim,)

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, self.parts, self.block_size, self.num_kv_heads, self.head_dim)

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
        payload = _quantize(np.asarray(kv, dtype=np.float32), layout)
    else:
        if kv.dtype != layout.storage_dtype:
            raise ValueError(f"kv dtype {kv.dtype} != {layout.storage_dtype} for {layout.dtype}")
        payload = np.ascontiguousarray(kv).tobytes()
    header = _HEADER.pack(
        MAGIC,
        VERSION,
        FLAG_INT8 if int8 else 0,
        _DTYPES[layout.dtype][0],
        layout.parts,
        layout.num_layers,
        layout.block_size,
        layout.num_kv_heads,
        layout.head_dim,
        _first_segment(layout),
        len(payload),
        zlib.crc32(payload),
        _check_hash(block_hash),
    )
    return header + payload


def decode_block(
    data: bytes, block_hash: bytes, layout: KVLayout, int8: bool = False
) -> np.ndarray:
    """Validate an entry against the expected hash, layout and format; return [L, P, B, H, D].

    raw entries come back in layout.storage_dtype (a read-only view of `data`), int8 entries
    dequantized to float32. Raises CodecError on any mismatch.
    """
    if len(data) < HEADER_SIZE:
        raise CodecError(f"truncated header: {len(data)} bytes")
    magic, version, flags, code, parts, layers, bs, heads, dim, seg, size, crc, h = (
        _HEADER.unpack_from(data)
    )
    if magic != MAGIC:
        raise CodecError("bad magic")
    if version != VERSION:
        raise CodecError(f"unsupported version {version}")
    if h != _check_hash(block_hash):
        raise CodecError("entry belongs to another block hash")
    if (parts, layers, bs, heads, dim, seg) != (
        layout.parts,
        layout.num_layers,
        layout.block_size,
        layout.num_kv_heads,
        layout.head_dim,
        _first_segment(layout),
    ) or _CODES.get(code) != layout.dtype:
        raise CodecError(
            f"layout mismatch: P={parts} L={layers} B={bs} H={heads} D={dim} first segment "
            f"{seg} dtype={_CODES.get(code)}, expected {layout}"
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


def _first_segment(layout: KVLayout) -> int:
    return layout.row_segments[0] if len(layout.row_segments) > 1 else 0


def _num_scales(layout: KVLayout) -> int:
    return layout.num_layers * layout.parts * layout.num_kv_heads * len(layout.row_segments)


def _int8_size(layout: KVLayout) -> int:
    return _num_scales(layout) * 4 + layout.num_elements


def _segment_bounds(layout: KVLayout) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for size in layout.row_segments:
        bounds.append((start, start + size))
        start += size
    return bounds


def _quantize(kv: np.ndarray, layout: KVLayout) -> bytes:
    # kv [L, P, B, H, D] -> scales [L, P, H, S] over (B, segment), values int8 [L, P, B, H, D]
    amax = np.stack(
        [np.abs(kv[..., a:b]).max(axis=(2, 4)) for a, b in _segment_bounds(layout)], axis=-1
    )
    scales = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.empty(kv.shape, dtype=np.int8)
    for s, (a, b) in enumerate(_segment_bounds(layout)):
        scaled = kv[..., a:b] / scales[:, :, None, :, None, s]
        q[..., a:b] = np.rint(scaled).clip(-127, 127)
    return scales.tobytes() + q.tobytes()


def _dequantize(payload: memoryview, layout: KVLayout) -> np.ndarray:
    L, P, B, H, D = layout.shape
    n_scales = _num_scales(layout)
    scales = np.frombuffer(payload[: n_scales * 4], dtype=np.float32).reshape(L, P, 1, H, -1)
    q = np.frombuffer(payload[n_scales * 4 :], dtype=np.int8).reshape(layout.shape)
    out = q.astype(np.float32)
    for s, (a, b) in enumerate(_segment_bounds(layout)):
        out[..., a:b] *= scales[..., s : s + 1]
    return out
