"""`moeserve generate` as outsiders use it, and the loader's refusal of unknown architectures."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from serve_app.model.config import UnsupportedModelError, load_model_spec


def moeserve_generate(model, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "serve_app.cli", "generate", "--model", str(model), *args]
    return subprocess.run(cmd, capture_output=True, text=True)


def test_generate_json_lines_in_input_order(qwen3_tiny, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"The river"\n{"prompt": "café 東京"}\n\n"1, 2, 3,"\n')
    out = moeserve_generate(
        qwen3_tiny, "--prompts-file", str(prompts), "--max-tokens", "5", "--json"
    )
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["prompt"] for r in rows] == ["The river", "café 東京", "1, 2, 3,"]
    for r in rows:
        assert len(r["token_ids"]) == 5 and r["finish_reason"] == "length"
        assert isinstance(r["text"], str)


def test_generate_rejects_bad_input_with_exit_code(qwen3_tiny):
    out = moeserve_generate(qwen3_tiny, "--prompt", "", "--json")
    assert out.returncode == 2 and "prompt must not be empty" in out.stderr


def test_unsupported_architecture_is_named(qwen3_tiny, tmp_path):
    model = tmp_path / "gpt2ish"
    shutil.copytree(qwen3_tiny, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError) as e:
        load_model_spec(model)
    assert "GPT2LMHeadModel" in str(e.value) and "Qwen3MoeForCausalLM" in str(e.value)
