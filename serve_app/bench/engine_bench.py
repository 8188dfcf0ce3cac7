"""`moeserve bench engine`: offline output throughput of moeserve vs transformers vs vLLM.

Every system runs the same token-id workloads on the same checkpoint in one invocation, one
system after another (model load and a short warm-up are excluded from timing). The machine
is shared, so compare the ratios of one run, not absolute numbers across runs. `--repeat N`
runs the whole sequence N times: the table shows each figure's median round and every
round's ratio, so a claim rests on more than one.

`--modes fp32,bf16,int8,int4` runs moeserve once per weight mode instead (then vLLM at its float
dtype) and reports each mode's ratio over the first and over vLLM (mode_report.py); the
`decode` workload times decode alone (decode_clock.py); machine.py records the CPU's flags and
a measured read bandwidth beside every figure.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, replace
from pathlib import Path

from serve_app.bench.config import BenchConfig
from serve_app.bench.machine import machine_info, machine_line
from serve_app.bench.modes import Mode, parse_modes
from serve_app.bench.report import (
    SYSTEMS,
    format_table,
    median_round,
    report_json,
    write_json,
    write_plot,
)
from serve_app.bench.result import RunResult
from serve_app.bench.vllm_baseline import VllmRun
from serve_app.bench.workloads import (
    FixedSpec,
    build_workload,
    fit_to_model_len,
    resolve_specs,
    token_pool,
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
    try:
        specs = resolve_specs(
            names, args.num_prompts, _int_list(args.decode_batches), args.decode_output_len
        )
        modes = parse_modes(args.modes, args.dtype) if args.modes else None
        if modes is not None and args.quantization != "none":
            raise ValueError(
                "--modes names each mode's quantization (int8, bf16+int4...): drop --quantization"
            )
        config = BenchConfig(
            quantization=args.quantization,
            quantization_group_size=args.quantization_group_size,
            dtype=args.dtype,
            vllm_dtype=args.vllm_dtype,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    unknown = sorted(skip - set(SYSTEMS))
    if unknown or not names:
        print(f"unknown systems {unknown}; systems: {list(SYSTEMS)}", file=sys.stderr)
        return 2
    if args.repeat < 1:
        print(f"--repeat must be at least 1, got {args.repeat}", file=sys.stderr)
        return 2
    vllm_model = args.vllm_model or model_dir
    pool = _token_pool(model_dir)
    workloads = [
        build_workload(name, fit_to_model_len(spec, config.max_model_len), pool)
        for name, spec in specs
    ]
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
    vllm = None
    for n in range(args.repeat):
        if args.repeat > 1:
            print(f"round {n + 1} of {args.repeat}", flush=True)
        by_workload: dict[str, dict[str, RunResult]] = {w.name: {} for w in workloads}
        if modes is None:
            _run_systems(by_workload, model_dir, workloads, warmup, config, skip)
        else:
            _run_modes(by_workload, model_dir, workloads, warmup, config, modes)
        if "vllm" not in skip:
            vllm = _run_vllm(by_workload, vllm_model, workloads, warmup, config, missing, out_dir)
        rounds.append(by_workload)

    machine = machine_info(vllm.version if vllm else None)
    print()
    print(_vllm_line(vllm, vllm_model, model_dir))
    if modes is not None:
        vllm_json = _vllm_json(vllm, vllm_model)
        return _report_modes(
            model_dir, workloads, rounds, modes, vllm, vllm_json, config, missing, machine, out_dir
        )
    by_workload = median_round(rounds)
    print(f"machine: {machine_line(machine)}")
    print(format_table(workloads, by_workload, missing, rounds))
    data = report_json(workloads, by_workload, missing, machine, asdict(config), rounds)
    data["vllm"] = _vllm_json(vllm, vllm_model)
    write_json(out_dir / "engine_bench.json", data)
    title = (
        f"{Path(model_dir).name} {config.dtype}, quantization {config.quantization}, output "
        f"tok/s, higher is better\n{machine_line(machine)}\nkernels: {machine['kernel_blocking']}"
    )
    write_plot(out_dir / "engine_bench.png", workloads, by_workload, title)
    print(f"wrote {out_dir / 'engine_bench.json'} and {out_dir / 'engine_bench.png'}")
    return 0


def _report_modes(
    model_dir: str,
    workloads: list,
    rounds: list,
    modes: list[Mode],
    vllm: VllmRun | None,
    vllm_json: dict | None,
    config: BenchConfig,
    missing: dict[str, str],
    machine: dict,
    out_dir: Path,
) -> int:
    from serve_app.bench.mode_report import mode_table, modes_json, write_modes_plot

    label = f"vllm ({(vllm and vllm.dtype) or config.vllm_float_dtype})"
    print(mode_table(workloads, rounds, modes, label, missing, f"machine: {machine_line(machine)}"))
    data = modes_json(workloads, rounds, modes, vllm_json, missing, machine, asdict(config))
    write_json(out_dir / "engine_bench_modes.json", data)
    title = f"{Path(model_dir).name}: modes and {label}\n{machine_line(machine)}"
    write_modes_plot(out_dir / "engine_bench_modes.png", workloads, rounds, modes, title, label)
    print(f"wrote {out_dir / 'engine_bench_modes.json'} and {out_dir / 'engine_bench_modes.png'}")
    return 0


def _run_systems(
    by_workload: dict[str, dict[str, RunResult]],
    model_dir: str,
    workloads: list,
    warmup,
    config: BenchConfig,
    skip: set[str],
) -> None:
    """moeserve and transformers (unless skipped), one after the other, on every workload."""
    if "moeserve" not in skip:
        from serve_app.bench.moeserve_runner import run_moeserve

        _collect(by_workload, run_moeserve(model_dir, workloads, warmup, config))
    if "transformers" not in skip:
        from serve_app.bench.hf_baseline import run_transformers

        _collect(by_workload, run_transformers(model_dir, workloads, warmup, config))


def _run_modes(
    by_workload: dict[str, dict[str, RunResult]],
    model_dir: str,
    workloads: list,
    warmup,
    config: BenchConfig,
    modes: list[Mode],
) -> None:
    """moeserve once per mode, in order (a fresh engine each: load untimed, warm-up)."""
    from serve_app.bench.moeserve_runner import run_moeserve

    for m in modes:
        print(f"moeserve mode {m.name}: {m.dtype}, quantization {m.quantization}", flush=True)
        cfg = replace(config, dtype=m.dtype, quantization=m.quantization)
        results = run_moeserve(model_dir, workloads, warmup, cfg)
        _collect(by_workload, [replace(r, system=m.system) for r in results])


def _run_vllm(
    by_workload: dict[str, dict[str, RunResult]],
    vllm_model: str,
    workloads: list,
    warmup,
    config: BenchConfig,
    missing: dict[str, str],
    out_dir: Path,
) -> VllmRun:
    from serve_app.bench.vllm_baseline import run_vllm

    log_path = out_dir / "vllm_worker.log"
    print(f"running vLLM in .venv-vllm (log: {log_path})", flush=True)
    vr = run_vllm(vllm_model, workloads, warmup, config, log_path)
    _collect(by_workload, vr.results)
    if vr.unavailable:
        missing["vllm"] = vr.unavailable
    return vr


def _vllm_json(vllm: VllmRun | None, vllm_model: str) -> dict | None:
    if vllm is None:
        return None
    return {"version": vllm.version, "dtype": vllm.dtype, "model": str(vllm_model)}


def _vllm_line(vllm: VllmRun | None, vllm_model: str, model_dir: str) -> str:
    """How vLLM ran: it cannot quantize at load on CPU, so against int8 / int4 it runs the
    float checkpoint at its dtype, unless --vllm-model names a pre-quantized one."""
    if vllm is None or vllm.unavailable:
        return f"vllm: not run{f' ({vllm.unavailable})' if vllm else ''}"
    own = "the same checkpoint" if str(vllm_model) == str(model_dir) else str(vllm_model)
    return (
        f"vllm {vllm.version or '?'} on {own} at {vllm.dtype or '?'} (vLLM on CPU does not "
        "quantize at load: a pre-quantized checkpoint only through --vllm-model)"
    )


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected a comma list of integers, got {text!r}") from None


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
