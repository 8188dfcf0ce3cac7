"""Chained block hashes for automatic prefix caching. Pure functions, no torch.

A block's hash covers its own token ids and, through the parent hash, every token before it.
The chain starts from a root that mixes an explicit seed with a namespace (the model digest),
so every process on every machine computes the same hash for the same prefix of the same model,
and two model versions never share a block.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

_DOMAIN = b"moeserve/block-hash/v1"


def root_hash(seed: int, namespace: str) -> bytes:
    """The parent hash of a sequence's first block."""
    return hashlib.sha256(_DOMAIN + struct.pack("<q", seed) + namespace.encode()).digest()


def adapter_root(root: bytes, adapter_digest: str) -> bytes:
    """The chain root of a request that runs a LoRA adapter: its KV differs from the base
    model's, so its blocks never meet the base model's or another adapter's. Keyed by the
    adapter's content digest, not its name, so a reload with new weights shares nothing."""
    return hashlib.sha256(root + b"lora:" + adapter_digest.encode()).digest()


def hash_block(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """sha256(parent || token ids as little-endian uint32). Platform-independent by construction."""
    return hashlib.sha256(parent + struct.pack(f"<{len(token_ids)}I", *token_ids)).digest()


def extend_block_hashes(
    hashes: list[bytes], token_ids: Sequence[int], block_size: int, root: bytes
) -> list[bytes]:
    """Append the hashes of the full blocks of token_ids not yet in `hashes`; returns `hashes`."""
    num_full = len(token_ids) // block_size
    parent = hashes[-1] if hashes else root
    for i in range(len(hashes), num_full):
        parent = hash_block(parent, token_ids[i * block_size : (i + 1) * block_size])
        hashes.append(parent)
    return hashes
