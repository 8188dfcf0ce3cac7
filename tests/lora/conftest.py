"""The parity adapters of tests/lora/peft_cases.py, built once per session for every test
that serves them (in-process and over expert shards), with their merged references."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def parity_adapters(tmp_path_factory):
    """arch -> {kind: PEFT adapter dir}, each built on first use."""
    from tests.conftest import tiny_model_dir
    from tests.lora.peft_cases import arch_adapters

    root: Path = tmp_path_factory.mktemp("parity-adapters")
    return lambda arch: arch_adapters(arch, tiny_model_dir(arch), root)
