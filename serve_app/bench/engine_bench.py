"""`moeserve bench engine`: offline output throughput of moeserve vs transformers vs vLLM.

Every system runs the same token-id workloads on the same checkpoint in one invocation, one
system after another (model load and a short warm-up are excluded from timing). The machine
is shared, so compare the ratios of one run, not absolute numbers across runs. `--repeat N`
runs the whole sequence N times: the table shows each figure's median round and every
round's ratio, so a claim rests on more than one.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from dataclasses import asdict
from pathlib import Path

from serve_app.bench.config import BenchConfig
from serve_app.bench.report import (
    SYSTEMS,
    format_table,
    median_round,
    report_json,
    write_json,
    write_plot,
)
from serve_app.bench.result import RunResult
from serve_app.bench.workloads import (
    DEFAULT_SPECS,
    FixedSpec,
    build_workload,
    fit_to_model_len,
    token_pool,
    with_num_prompts,
)


def run_engine_bench(args: argparse.Namespace) -> int:
    model_dir = args.model
    if not (Path(model_dir) / "config.json").exists():
        print(
            f"no checkpoint at {model_dir}; build it with `moeserve make-model --arch qwen3_moe "
            f"--preset small --out {model_dir} --seed 0`",
            file=sys.stderr,
        )
        return 2
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = [n for n in names if n not in DEFAULT_SPECS] + sorted(skip - set(SYSTEMS))
    if unknown or not names:
        print(
            f"unknown workload/system {unknown}; workloads: {list(DEFAULT_SPECS)}, "
            f"systems: {list(SYSTEMS)}",
            file=sys.stderr,
        )
        return 2

    if args.repeat < 1:
        print(f"--repeat must be at least 1, got {args.repeat}", file=sys.stderr)
        return 2
    config = BenchConfig(
        quantization=args.quantization,
        quantization_group_size=args.quantization_group_size,
        dtype="float32" if args.dtype == "auto" else args.dtype,
    )
    pool = _token_pool(model_dir)
    workloads = []
    for name in names:
        spec = DEFAULT_SPECS[name]
        if args.num_prompts is not None:
            spec = with_num_prompts(spec, args.num_prompts)
        workloads.append(build_workload(name, fit_to_model_len(spec, config.max_model_len), pool))
    warmup = build_workload(
        "warmup",
        FixedSpec(
            config.warmup_prompts,
            config.warmup_input_len,
            config.warmup_output_len,
            config.warmup_seed,
        ),
        pool,
    )
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for w in workloads:
        print(
            f"workload {w.name}: {len(w.requests)} prompts, {w.num_prompt_tokens} tokens in, "
            f"{w.num_output_tokens} out",
            flush=True,
        )

    missing = {s: "skipped (--skip)" for s in skip}
    rounds: list[dict[str, dict[str, RunResult]]] = []
    vllm_version = None
    for n in range(args.repeat):
        if args.repeat > 1:
            print(f"round {n + 1} of {args.repeat}", flush=True)
        by_workload: dict[str, dict[str, RunResult]] = {w.name: {} for w in workloads}
        vllm_version = _run_round(
            by_workload, model_dir, workloads, warmup, config, skip, missing, out_dir
        )
        rounds.append(by_workload)
    by_workload = median_round(rounds)

    machine = machine_info(vllm_version)
    table = format_table(workloads, by_workload, missing, rounds)
    print()
    print(table)
    data = report_json(workloads, by_workload, missing, machine, asdict(config), rounds)
    write_json(out_dir / "engine_bench.json", data)
    title = (
        f"{Path(model_dir).name} on {machine['cpu_count']} CPU ({machine['cpu_model']}), "
        f"output tok/s, higher is better\nkernels: {machine['kernel_blocking']}"
    )
    write_plot(out_dir / "engine_bench.png", workloads, by_workload, title)
    print(f"wrote {out_dir / 'engine_bench.json'} and {out_dir / 'engine_bench.png'}")
    return 0


def _run_round(
    by_workload: dict[str, dict[str, RunResult]],
    model_dir: str,
    workloads: list,
    warmup,
    config: BenchConfig,
    skip: set[str],
    missing: dict[str, str],
    out_dir: Path,
) -> str | None:
    """Every system not skipped, one after another, on every workload; vLLM's version."""
    if "moeserve" not in skip:
        from serve_app.bench.moeserve_runner import run_moeserve

        _collect(by_workload, run_moeserve(model_dir, workloads, warmup, config))
    if "transformers" not in skip:
        from serve_app.bench.hf_baseline import run_transformers

        _collect(by_workload, run_transformers(model_dir, workloads, warmup, config))
    if "vllm" in skip:
        return None
    from serve_app.bench.vllm_baseline import run_vllm

    log_path = out_dir / "vllm_worker.log"
    print(f"running vLLM in .venv-vllm (log: {log_path})", flush=True)
    vr = run_vllm(model_dir, workloads, warmup, config, log_path)
    _collect(by_workload, vr.results)
    if vr.unavailable:
        missing["vllm"] = vr.unavailable
    return vr.version


def machine_info(vllm_version: str | None) -> dict:
    import torch
    import transformers

    from serve_app.bench.vllm_baseline import usable_cpus
    from serve_app.kernels import cpu as cpu_kernels

    kernels = cpu_kernels.load()
    return {
        "kernel_blocking": str(kernels.blocking) if kernels is not None else None,
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable_cpus(),
        "cpu_model": _cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "vllm_version": vllm_version,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def _token_pool(model_dir: str) -> list[int]:
    from transformers import AutoConfig, AutoTokenizer

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    return token_pool(vocab, AutoTokenizer.from_pretrained(model_dir).all_special_ids)


def _collect(by_workload: dict[str, dict[str, RunResult]], results: list[RunResult]) -> None:
    for r in results:
        by_workload[r.workload][r.system] = r
        print(
            f"  {r.system:<13} {r.workload:<8} {r.output_tokens_per_s:8.1f} tok/s "
            f"({r.output_tokens} tokens in {r.elapsed_s:.1f}s)",
            flush=True,
        )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
