"""The model digest names one exact model version and KV layout (it namespaces shared KV)."""

from __future__ import annotations

import shutil

from serve_app.model.digest import model_digest

LAYOUT = {"dtype": "torch.float32", "block_size": 16, "kv_dtype": "torch.float32"}


def test_digest_covers_weights_tokenizer_config_and_kv_layout(tmp_path):
    base = tmp_path / "m"
    base.mkdir()
    for name, data in {
        "config.json": b"{}",
        "tokenizer.json": b"tok",
        "model.safetensors": b"w" * 1000,
    }.items():
        (base / name).write_bytes(data)
    d0 = model_digest(base, **LAYOUT)
    assert model_digest(base, **LAYOUT) == d0  # stable

    def changed(name: str, data: bytes) -> str:
        other = tmp_path / f"m-{name}"
        shutil.copytree(base, other)
        (other / name).write_bytes(data)
        return model_digest(other, **LAYOUT)

    assert changed("model.safetensors", b"w" * 999 + b"x") != d0
    assert changed("model-00002.safetensors", b"more") != d0
    assert changed("tokenizer.json", b"tok2") != d0
    assert changed("merges.txt", b"a b") != d0
    assert changed("config.json", b'{"x": 1}') != d0
    assert changed("README.md", b"docs do not matter") == d0
    for key, value in (("dtype", "torch.bfloat16"), ("block_size", 32), ("kv_dtype", "int8")):
        assert model_digest(base, **{**LAYOUT, key: value}) != d0
