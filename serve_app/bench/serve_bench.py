"""`moeserve bench serve`: TTFT, TPOT and output throughput of OpenAI servers under N streams.

Targets are measured one after another, never side by side (the machines have 2 cores):
- `--url LABEL=URL`: a server that is already running;
- `--launch NAME`: a server this command starts, measures and stops:
  `moeserve` (one process), `moeserve-epN` (`moeserve serve --ray --ep N`), `vllm` (`vllm
  serve` from .venv-vllm, PEERS.md's flags), `inproc` (the same prompts straight into the
  engine in this process, configured as the Ray app's router replica, shared prefix cache tier
  included: no HTTP, no Serve; the reference the serving path is measured against),
  `inproc-local` (the same without the shared tier). The first target is the baseline of the ratios.

For launched servers each pass also splits the server's CPU by role (serve_app.bench.cpu_usage):
the serving path's CPU per output token is the cost of carrying a token from engine to client.

Every concurrency level gets its own prompts (one seed per level), the same for every target:
targets see identical load, and a prefix cache cannot carry hits from one pass to the next.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

from serve_app.bench import cpu_usage
from serve_app.bench.config import BenchConfig
from serve_app.bench.launcher import (
    LAUNCH_NAME,
    first_error_line,
    free_port,
    launch_command,
    served_model,
    start_server,
    stop_server,
    vllm_version,
    wait_ready,
)
from serve_app.bench.load import Endpoint, PassResult, run_pass, summarize
from serve_app.bench.result import loadavg_1m
from serve_app.bench.serve_report import PassRun, TargetRun

INPROC = "inproc"  # the engine as the Ray app runs it, shared prefix cache tier included
INPROC_LOCAL = "inproc-local"  # the same without the shared tier (the one-process server's)
INPROC_TARGETS = (INPROC, INPROC_LOCAL)
DEFAULT_LAUNCH = (INPROC, "moeserve-ep0", "moeserve-ep2", "vllm")


@dataclass(frozen=True, slots=True)
class ServeBenchConfig:
    concurrencies: tuple[int, ...] = (1, 8, 32)
    num_prompts: int = 64
    input_len: int = 128
    output_len: int = 64
    warmup_requests: int = 4  # before each target's first pass, not counted
    warmup_output_len: int = 8
    seed: int = 0
    ready_timeout_s: float = 300.0
    stop_grace_s: float = 60.0
    serve_args: tuple[str, ...] = ()  # appended to each launched `moeserve serve`
    prefix_write_policy: str | None = None  # inproc's and (in serve_args) the launched ones'
    repeat: int = 1  # rounds of every target in turn; >1: each goal summarised over them

    def __post_init__(self) -> None:
        if not self.concurrencies or any(c < 1 for c in self.concurrencies):
            raise ValueError(f"concurrency levels must be >= 1, got {self.concurrencies}")
        if len(set(self.concurrencies)) != len(self.concurrencies):
            raise ValueError(f"repeated concurrency level in {self.concurrencies}")
        for name in ("num_prompts", "input_len", "output_len", "warmup_output_len", "repeat"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_requests < 0:
            raise ValueError(f"warmup_requests must be >= 0, got {self.warmup_requests}")


class TargetSpec(NamedTuple):
    label: str
    url: str | None = None  # already running
    launch: str | None = None  # or started by us


def parse_concurrency(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--concurrency wants a comma list of integers, got {text!r}") from None


def parse_targets(items: list[tuple[str, str]] | None) -> list[TargetSpec]:
    """(kind, value) pairs in command-line order: ("url", "LABEL=URL") or ("launch", NAME)."""
    items = items or [("launch", name) for name in DEFAULT_LAUNCH]
    specs = []
    for kind, value in items:
        if kind == "url":
            label, sep, url = value.partition("=")
            if not sep or not label or not url.startswith(("http://", "https://")):
                raise ValueError(f"--url wants LABEL=http://HOST:PORT, got {value!r}")
            url = url.rstrip("/")
            specs.append(TargetSpec(label, url=url.removesuffix("/v1")))
        elif LAUNCH_NAME.match(value) or value in INPROC_TARGETS:
            specs.append(TargetSpec(value, launch=value))
        else:
            raise ValueError(
                f"--launch: unknown {value!r}; moeserve, moeserve-epN, vllm, {INPROC} or "
                f"{INPROC_LOCAL}"
            )
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"target labels must be unique, got {labels}")
    return specs


# --- prompts ---------------------------------------------------------------------------------


def fit_prompt(
    ids: list[int],
    n: int,
    encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    filler: Iterator[int],
) -> tuple[str, int]:
    """Text that encodes to n tokens, and its actual count. Random ids rarely survive decode
    then encode unchanged (merges, split multi-byte characters), so re-encode, cut or pad,
    and retry. A cut that splits a character grows again, so each overshoot cuts one deeper."""
    text, deeper = decode(ids), 0
    for _ in range(16):
        got = encode(text)
        if len(got) == n:
            return text, n
        if len(got) > n:
            ids, deeper = got[: max(n - deeper, 0)], deeper + 1
        else:
            ids = got + [next(filler) for _ in range(n - len(got))]
        text = decode(ids)
    return text, len(encode(text))


def random_prompts(tokenizer, num: int, input_len: int, seed: int) -> list[str]:
    """`num` prompts of random tokens that the server will count as input_len tokens."""
    import random

    from serve_app.bench.workloads import FixedSpec, build_workload, token_pool

    n = input_len - len(tokenizer.encode("", add_special_tokens=True))  # BOS, if it adds one
    if n < 1:
        raise ValueError(f"input_len {input_len} leaves no room after special tokens")
    pool = token_pool(len(tokenizer), tokenizer.all_special_ids)
    work = build_workload("serve", FixedSpec(num, n, 1, seed), pool)
    rng = random.Random(seed)
    # Padding draws only tokens that decode to whole characters (no U+FFFD fragments).
    filler = (
        t
        for t in iter(lambda: pool[rng.randrange(len(pool))], None)
        if "\ufffd" not in tokenizer.decode([t])
    )

    def encode(t: str) -> list[int]:
        return tokenizer.encode(t, add_special_tokens=False)

    prompts, off = [], 0
    for r in work.requests:
        text, got = fit_prompt(r.prompt_token_ids, n, encode, tokenizer.decode, filler)
        prompts.append(text)
        off += got != n
    if off:
        print(f"  note: {off}/{num} prompts are not exactly {input_len} tokens", flush=True)
    return prompts


# --- measuring -------------------------------------------------------------------------------


Pass = Callable[[Sequence[str], int, int], PassResult]  # (prompts, max_tokens, concurrency)


def measure(
    run: TargetRun,
    send: Pass,
    cfg: ServeBenchConfig,
    prompts: dict,
    warmup: list[str],
    cpu_sample: Callable[[], list[cpu_usage.ProcCpu]] | None = None,
) -> None:
    """Warm up, then one pass per concurrency level; fills run.passes (or run.skipped).
    cpu_sample (launched servers): the server's processes, sampled around each pass."""
    if warmup:
        res = send(warmup, cfg.warmup_output_len, len(warmup))
        if not any(r.ok for r in res.records):
            bad = res.records[0]
            run.skipped = f"warm-up failed: {bad.status} {bad.error}"
            return
    for c in cfg.concurrencies:
        load0 = loadavg_1m()
        cpu0 = cpu_sample() if cpu_sample else None
        res = send(prompts[c], cfg.output_len, c)
        cpu = cpu_usage.split(cpu0, cpu_sample()) if cpu_sample else None
        s = summarize(res.records, res.duration_s, c)
        run.passes.append(PassRun(s, res.records, (load0, loadavg_1m()), cpu))
        ttft = f"{s.ttft_ms.p50:.0f}" if s.ttft_ms else "-"
        tpot = f"{s.tpot_ms.p50:.1f}" if s.tpot_ms else "-"
        per_tok = cpu.per_token_ms(s.output_tokens) if cpu else None
        serving = f", serving CPU {per_tok:.2f} ms/token" if per_tok is not None else ""
        print(
            f"  {run.label} c={c}: {s.num_ok} ok, {s.num_failed} failed, "
            f"{s.output_tok_s:.1f} out tok/s, TTFT p50 {ttft} ms, TPOT p50 {tpot} ms{serving}",
            flush=True,
        )


def http_pass(endpoint: Endpoint) -> Pass:
    return lambda prompts, max_tokens, c: asyncio.run(run_pass(endpoint, prompts, max_tokens, c))


def client_api_key(launched: bool) -> str | None:
    """OPENAI_API_KEY, as vllm bench serve sends it; but a moeserve we start inherits
    MOESERVE_API_KEY (one key or a comma list) and then wants one of those."""
    own = os.environ.get("MOESERVE_API_KEY", "").split(",")[0].strip()
    return own if launched and own else os.environ.get("OPENAI_API_KEY")


def run_target(
    spec: TargetSpec,
    cfg: ServeBenchConfig,
    model: str,
    out_dir: Path,
    prompts: dict,
    warmup: list[str],
) -> TargetRun:
    api_key = client_api_key(launched=spec.launch is not None)
    if spec.url is not None:
        run = TargetRun(spec.label, f"url {spec.url}")
        try:
            run.model = served_model(spec.url, api_key)
        except (OSError, ValueError, KeyError, IndexError) as e:
            run.skipped = f"GET {spec.url}/v1/models failed: {e}"
            return run
        measure(run, http_pass(Endpoint(spec.url, run.model, api_key)), cfg, prompts, warmup)
        return run
    if spec.launch in INPROC_TARGETS:
        return run_inproc(spec, cfg, model, prompts, warmup)

    run = TargetRun(spec.label, f"launch {spec.launch}")
    port = free_port()
    run_dir = tempfile.mkdtemp(prefix=f"moeserve-bench-{spec.label}-")
    try:
        launch = launch_command(spec.launch, model, port, run_dir, cfg.serve_args)
        if isinstance(launch, str):
            run.skipped = launch
            return run
        run.command, run.log = launch.argv, str(out_dir / f"{spec.label}.log")
        print(f"starting {spec.label} on port {port} (log: {run.log})", flush=True)
        proc = start_server(launch, Path(run.log))
        try:
            url = f"http://127.0.0.1:{port}"
            t0 = time.monotonic()
            run.model = wait_ready(url, proc, cfg.ready_timeout_s, api_key)
            print(f"  ready in {time.monotonic() - t0:.0f} s", flush=True)
            endpoint = Endpoint(url, run.model, api_key)
            sample = functools.partial(cpu_usage.sample_session, proc.pid)
            measure(run, http_pass(endpoint), cfg, prompts, warmup, sample)
        except (RuntimeError, TimeoutError) as e:
            run.skipped = str(e)
        finally:
            stop_server(proc, cfg.stop_grace_s)
        if run.skipped:
            cause = first_error_line(Path(run.log))
            run.skipped += f" [{cause}] (log: {run.log})" if cause else f" (log: {run.log})"
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return run


def run_inproc(
    spec: TargetSpec, cfg: ServeBenchConfig, model: str, prompts: dict, warmup: list[str]
) -> TargetRun:
    """The engine in this process, driven like the HTTP targets (serve_app.bench.inproc)."""
    from serve_app.bench.inproc import build_engine, run_inproc_pass

    run = TargetRun(spec.label, f"launch {spec.launch}", model=Path(model).name)
    print(f"starting {spec.label}: the engine in this process", flush=True)
    cache_dir = tempfile.mkdtemp(prefix="moeserve-bench-redis-") if spec.launch == INPROC else None
    engine = build_engine(model, BenchConfig(), cache_dir, write_policy=cfg.prefix_write_policy)
    try:

        def send(ps: Sequence[str], max_tokens: int, c: int) -> PassResult:
            return asyncio.run(run_inproc_pass(engine, ps, max_tokens, c))

        measure(run, send, cfg, prompts, warmup, cpu_usage.sample_self)
    finally:
        engine.shutdown()  # also stops the embedded redis-server it started
        if cache_dir is not None:
            shutil.rmtree(cache_dir, ignore_errors=True)
    return run


def bench_config(args: argparse.Namespace) -> ServeBenchConfig:
    """The flags of `moeserve bench serve` (ValueError on a bad one). A write policy goes to the
    in-process engine and, as a flag, to every launched `moeserve serve`."""
    policy = args.prefix_write_policy
    return ServeBenchConfig(
        concurrencies=parse_concurrency(args.concurrency),
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        warmup_requests=args.warmup,
        seed=args.seed,
        serve_args=tuple(shlex.split(args.serve_args or ""))
        + (("--prefix-write-policy", policy) if policy else ()),
        prefix_write_policy=policy,
        repeat=args.repeat,
    )


def run_serve_bench(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    try:
        cfg = bench_config(args)
        specs = parse_targets(args.targets)
    except ValueError as e:
        print(f"moeserve bench serve: {e}", file=sys.stderr)
        return 2
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    prompts = {
        c: random_prompts(tokenizer, cfg.num_prompts, cfg.input_len, cfg.seed + i)
        for i, c in enumerate(cfg.concurrencies)
    }
    warmup = []
    if cfg.warmup_requests:
        seed = BenchConfig().warmup_seed
        warmup = random_prompts(tokenizer, cfg.warmup_requests, cfg.input_len, seed)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"{len(specs)} targets, concurrency {list(cfg.concurrencies)}, {cfg.num_prompts} prompts "
        f"of {cfg.input_len} tokens in, {cfg.output_len} out"
        + (f", {cfg.repeat} rounds" if cfg.repeat > 1 else ""),
        flush=True,
    )
    config = asdict(cfg) | {"model": args.model, "targets": [s._asdict() for s in specs]}
    rounds = []
    for k in range(cfg.repeat):
        round_dir = out_dir / f"round-{k + 1}" if cfg.repeat > 1 else out_dir
        round_dir.mkdir(parents=True, exist_ok=True)
        if cfg.repeat > 1:
            print(f"round {k + 1} of {cfg.repeat}", flush=True)
        runs = []
        for spec in specs:
            run = run_target(spec, cfg, args.model, round_dir, prompts, warmup)
            if run.skipped:
                print(f"  {spec.label}: skipped: {run.skipped}", flush=True)
            runs.append(run)
        _write_round(runs, cfg, config, args.model, round_dir)
        rounds.append(runs)
    if cfg.repeat > 1:
        _write_rounds(rounds, cfg, config, args.model, out_dir)
    return 0 if any(r.passes for runs in rounds for r in runs) else 1


def _machine(runs: list[TargetRun]) -> dict:
    from serve_app.bench.machine import machine_info

    ran_vllm = any(r.passes for r in runs if r.source == "launch vllm")
    machine = machine_info(vllm_version() if ran_vllm else None)
    machine["loadavg_end"] = list(os.getloadavg())
    return machine


def _title(cfg: ServeBenchConfig, model: str, machine: dict) -> str:
    return (
        f"{Path(model).name}: {cfg.num_prompts} prompts, {cfg.input_len} tokens in, "
        f"{cfg.output_len} out, on {machine['cpus_usable']} CPUs ({machine['cpu_model']})"
    )


def _write_round(
    runs: list[TargetRun], cfg: ServeBenchConfig, config: dict, model: str, out: Path
) -> None:
    from serve_app.bench.report import write_json
    from serve_app.bench.serve_report import format_table, report_json, write_plot

    levels = list(cfg.concurrencies)
    machine = _machine(runs)
    print()
    print(format_table(runs, levels))
    write_json(out / "serve_bench.json", report_json(runs, levels, config, machine))
    write_plot(out / "serve_bench.png", runs, levels, _title(cfg, model, machine))
    print(f"wrote {out / 'serve_bench.json'} and {out / 'serve_bench.png'}", flush=True)


def _write_rounds(
    rounds: list[list[TargetRun]], cfg: ServeBenchConfig, config: dict, model: str, out: Path
) -> None:
    from serve_app.bench.report import write_json
    from serve_app.bench.serve_rounds import goal_rounds, rounds_json, write_rounds_plot

    machine = _machine([r for runs in rounds for r in runs])
    goals = goal_rounds(rounds)
    print(f"\nover {len(rounds)} rounds (each round's table above; round-K/ holds its files):")
    for g in goals:
        print(g.line())
    levels = list(cfg.concurrencies)
    write_json(out / "serve_bench_rounds.json", rounds_json(rounds, levels, config, machine))
    title = f"{_title(cfg, model, machine)}, {len(rounds)} rounds"
    write_rounds_plot(out / "serve_bench_rounds.png", goals, title)
    print(f"wrote {out / 'serve_bench_rounds.json'} and {out / 'serve_bench_rounds.png'}")
