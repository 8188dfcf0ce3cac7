"""The shared-cache wire format: round trips, and every kind of bad entry is refused."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from serve_app.kvstore.codec import HEADER_SIZE, CodecError, KVLayout, decode_block, encode_block

LAYOUT = KVLayout(num_layers=3, block_size=4, num_kv_heads=2, head_dim=8, dtype="float32")
H = bytes(range(32))


def kv(seed: int = 0, layout: KVLayout = LAYOUT) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # per-head magnitudes that differ by 100x, as real K/V heads do
    scale = np.array([1.0, 100.0])[None, None, None, :, None]
    return (rng.standard_normal(layout.shape) * scale).astype(np.float32)


def test_raw_round_trip_is_exact_for_each_dtype():
    for dtype in ("float32", "float16", "bfloat16"):
        layout = KVLayout(3, 4, 2, 8, dtype)
        x = np.random.default_rng(1).integers(0, 2**15, layout.shape).astype(layout.storage_dtype)
        data = encode_block(H, x, layout)
        assert len(data) == HEADER_SIZE + x.nbytes
        np.testing.assert_array_equal(decode_block(data, H, layout), x)


def test_int8_round_trip_error_is_bounded_per_layer_and_head():
    x = kv()
    data = encode_block(H, x, LAYOUT, int8=True)
    # four times smaller than float32, plus one float32 scale per (layer, K/V, head)
    assert len(data) == HEADER_SIZE + x.size + 3 * 2 * 2 * 4
    y = decode_block(data, H, LAYOUT, int8=True)
    amax = np.abs(x).max(axis=(2, 4), keepdims=True)
    assert np.all(np.abs(y - x) <= amax / 254 * (1 + 1e-6))
    # the small head keeps its own precision: a single per-block scale would have lost it
    assert np.abs(y - x)[:, :, :, 0].max() < 0.05


def test_int8_of_zeros_is_zeros():
    z = np.zeros(LAYOUT.shape, np.float32)
    np.testing.assert_array_equal(
        decode_block(encode_block(H, z, LAYOUT, True), H, LAYOUT, True), z
    )


@pytest.mark.parametrize(
    "mutate, why",
    [
        (lambda d: d[: HEADER_SIZE - 1], "truncated header"),
        (lambda d: d[:-1], "payload is"),
        (lambda d: d + b"\0", "payload is"),
        (lambda d: b"XXXX" + d[4:], "bad magic"),
        (lambda d: d[:4] + struct.pack("<H", 1) + d[6:], "unsupported version"),
        (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "checksum"),
        (lambda d: d[:HEADER_SIZE] + bytes(len(d) - HEADER_SIZE), "checksum"),
    ],
)
def test_corrupt_entries_are_refused(mutate, why):
    data = encode_block(H, kv(), LAYOUT)
    with pytest.raises(CodecError, match=why):
        decode_block(mutate(data), H, LAYOUT)


def test_mismatched_hash_layout_dtype_or_format_are_refused():
    data = encode_block(H, kv(), LAYOUT)
    with pytest.raises(CodecError, match="another block hash"):
        decode_block(data, bytes(32), LAYOUT)
    for other in (
        KVLayout(2, 4, 2, 8, "float32"),
        KVLayout(3, 8, 2, 8, "float32"),
        KVLayout(3, 4, 1, 8, "float32"),
        KVLayout(3, 4, 2, 16, "float32"),
        KVLayout(3, 4, 2, 8, "float16"),
    ):
        with pytest.raises(CodecError, match="layout mismatch"):
            decode_block(data, H, other)
    with pytest.raises(CodecError, match="flags"):
        decode_block(data, H, LAYOUT, int8=True)
    with pytest.raises(CodecError, match="flags"):
        decode_block(encode_block(H, kv(), LAYOUT, int8=True), H, LAYOUT)


def test_encode_refuses_wrong_shape_dtype_and_hash():
    with pytest.raises(ValueError):
        encode_block(H, kv()[:2], LAYOUT)
    with pytest.raises(ValueError):
        encode_block(H, kv().astype(np.float16), LAYOUT)
    with pytest.raises(ValueError):
        encode_block(b"short", kv(), LAYOUT)


def test_the_dtype_travels_in_the_header_so_bf16_and_float32_blocks_never_mix():
    """A bf16 pool's block (engine.dtype bfloat16: the 16-bit patterns of float32 rounded to
    nearest even) round-trips bit-exactly; a reader of the other dtype refuses it, raw or INT8
    (whose payloads are the same size for either dtype: the header's dtype field refuses it)."""
    bf16 = KVLayout(3, 4, 2, 8, "bfloat16")
    x = kv(2, bf16)
    bits = (x.view(np.uint32) + 0x7FFF + ((x.view(np.uint32) >> 16) & 1)) >> 16  # RNE
    bits = bits.astype(np.uint16)
    data = encode_block(H, bits, bf16)
    assert len(data) == HEADER_SIZE + x.size * 2  # half a float32 entry
    np.testing.assert_array_equal(decode_block(data, H, bf16), bits)
    with pytest.raises(CodecError, match="dtype=bfloat16"):
        decode_block(data, H, LAYOUT)
    with pytest.raises(CodecError, match="dtype=float32"):
        decode_block(encode_block(H, kv(3), LAYOUT), H, bf16)
    for writer, reader in ((bf16, LAYOUT), (LAYOUT, bf16)):
        entry = encode_block(H, kv(4, writer), writer, int8=True)
        with pytest.raises(CodecError, match="dtype="):
            decode_block(entry, H, reader, int8=True)
