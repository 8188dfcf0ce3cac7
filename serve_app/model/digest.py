"""A digest that names one exact model version: weights, config, tokenizer and KV layout.

It namespaces prefix-cache block hashes, so two versions (blue/green, two seeds of the same
architecture) never share KV blocks, locally or in a shared cache.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# Everything that changes what a token id means or what the model computes from it.
_DIGEST_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
)


def model_digest(model_dir: str | Path, **kv_layout: object) -> str:
    """sha256 over config, tokenizer and weight files, plus the KV layout (dtype, block_size,
    kv_dtype: what a shared block holds)."""
    root = Path(model_dir)
    h = hashlib.sha256(b"moeserve/model-digest/v1")
    files = [root / n for n in _DIGEST_FILES] + sorted(root.glob("*.safetensors"))
    for path in files:
        if not path.exists():
            continue
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    for key in sorted(kv_layout):
        h.update(f"{key}={kv_layout[key]}\0".encode())
    return h.hexdigest()
