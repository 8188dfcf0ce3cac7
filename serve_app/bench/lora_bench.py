"""`moeserve bench lora`: what serving many LoRA adapters costs, in-process on the engine core
(token ids in and out, as `bench engine`'s decode workload; no HTTP, no text).

Workloads (issue 32's targets):
- `mixed`: the same prompts submitted at once, every request on the base model, then spread
  uniformly over `--mixed-adapters` adapters (all held): output tok/s, mixed over base
  (target >= 0.8x).
- `zipf`: `--zipf-adapters` adapters registered (known paths: a request's LoraRef loads its
  adapter on demand, as a router replica does), at most `--max-loras` held (LRU evicted),
  requests picking an adapter by Zipf(`--zipf-s`) popularity, `--concurrency` in flight
  (closed loop: one finishes, the next is submitted). Errors counted; P99 time to first token
  (from submission, so an on-demand load counts) over the same run on one adapter (target
  <= 2x).

Adapters are random q/v (by default) rank-16 PEFT adapters on the model (lora_adapters.py).
The prefix cache is off, so repeated prompts across runs and rounds compute the same work.
`--repeat N` runs both workloads N times, each round's pair back to back, with the order
within a pair swapped every other round (a neighbour's load drifting over a run would
otherwise favour one side); every round's ratio is reported.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from serve_app.bench.lora_report import PairResult, format_table, report_json, write_plot
from serve_app.bench.machine import machine_info, machine_line
from serve_app.bench.report import write_json

WORKLOADS = ("mixed", "zipf")
_ids = itertools.count()


@dataclass(frozen=True, slots=True)
class LoraBenchConfig:
    workloads: tuple[str, ...] = WORKLOADS
    num_prompts: int = 64  # mixed
    input_len: int = 128
    output_len: int = 32
    mixed_adapters: int = 8
    zipf_adapters: int = 200
    zipf_requests: int = 400
    zipf_s: float = 1.0
    concurrency: int = 16
    max_loras: int = 16  # held at once in the zipf run
    max_loras_per_batch: int | None = None
    rank: int = 16
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [w for w in self.workloads if w not in WORKLOADS]
        if bad or not self.workloads:
            raise ValueError(f"workloads must be a comma list of {', '.join(WORKLOADS)}")
        for name in (
            "num_prompts", "input_len", "output_len", "mixed_adapters", "zipf_adapters",
            "zipf_requests", "concurrency", "max_loras", "rank", "max_num_seqs",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1")
        if self.zipf_s < 0:
            raise ValueError("zipf-s must be >= 0")


def zipf_choices(num_items: int, n: int, s: float, seed: int) -> list[int]:
    """n draws of an item index, P(k) proportional to 1 / (k + 1) ** s."""
    weights = [1.0 / (k + 1) ** s for k in range(num_items)]
    return random.Random(seed).choices(range(num_items), weights=weights, k=n)


@dataclass(slots=True)
class RunStats:
    """One run of one side: tokens out, wall time, TTFT per request, errors."""

    output_tokens: int = 0
    elapsed_s: float = 0.0
    ttft_s: list[float] | None = None
    errors: int = 0

    @property
    def tok_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


def run_lora_bench(args: argparse.Namespace) -> int:
    model_dir = args.model
    if not (Path(model_dir) / "config.json").exists():
        print(f"no checkpoint at {model_dir}", file=sys.stderr)
        return 2
    try:
        config = LoraBenchConfig(
            workloads=tuple(w.strip() for w in args.workloads.split(",") if w.strip()),
            num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
            mixed_adapters=args.mixed_adapters, zipf_adapters=args.zipf_adapters,
            zipf_requests=args.zipf_requests, zipf_s=args.zipf_s, concurrency=args.concurrency,
            max_loras=args.max_loras, max_loras_per_batch=args.max_loras_per_batch,
            rank=args.rank, seed=args.seed,
        )  # fmt: skip
        if args.repeat < 1:
            raise ValueError(f"--repeat must be >= 1, got {args.repeat}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from serve_app.bench.lora_adapters import adapter_dirs

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    need = max(config.mixed_adapters if "mixed" in config.workloads else 1,
               config.zipf_adapters if "zipf" in config.workloads else 1)  # fmt: skip
    print(f"adapters: {need} under {args.adapter_dir} (made once, reused)", flush=True)
    paths = adapter_dirs(model_dir, Path(args.adapter_dir), need, config.rank, list(config.targets))
    pool = _token_pool(model_dir)
    rounds: dict[str, list[PairResult]] = {w: [] for w in config.workloads}
    engines = {w: _engine(model_dir, w, config, paths) for w in config.workloads}
    for n in range(args.repeat):
        if args.repeat > 1:
            print(f"round {n + 1} of {args.repeat}", flush=True)
        for w in config.workloads:
            run = _mixed if w == "mixed" else _zipf
            result = run(engines[w], config, paths, pool, swap=n % 2 == 1)
            rounds[w].append(result)
            print(f"  {w}: {result.line()}", flush=True)
    machine = machine_info(None, bandwidth=not args.no_bandwidth)
    print(f"\nmachine: {machine_line(machine)}")
    print(format_table(rounds))
    write_json(out_dir / "lora_bench.json", report_json(rounds, machine, asdict(config), model_dir))
    title = f"{Path(model_dir).name}: moeserve bench lora\n{machine_line(machine)}"
    write_plot(out_dir / "lora_bench.png", rounds, title)
    print(f"wrote {out_dir / 'lora_bench.json'} and {out_dir / 'lora_bench.png'}")
    return 0


def _engine(model_dir: str, workload: str, config: LoraBenchConfig, paths: list[str]):
    from serve_app.engine.config import EngineConfig
    from serve_app.runtime.factory import build_engine

    mixed = workload == "mixed"
    held = config.mixed_adapters if mixed else config.max_loras
    engine = build_engine(
        EngineConfig(
            model=model_dir,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            enable_prefix_caching=False,
            max_loras=max(held, config.max_loras_per_batch or 1),
            max_loras_per_batch=config.max_loras_per_batch,
            max_lora_rank=config.rank,
            # mixed: its adapters held from the start; zipf: loaded on demand
            lora_adapters=tuple((f"m{i}", p) for i, p in enumerate(paths))[
                : config.mixed_adapters if mixed else 0
            ],
        )
    )
    _warm_up(engine, paths[0], "m0" if mixed else "z0")
    return engine


def _mixed(engine, config: LoraBenchConfig, paths, pool, swap: bool) -> PairResult:
    from serve_app.engine.outputs import LoraRef

    prompts = _prompts(pool, config.num_prompts, config.input_len, config.seed)
    base = [None] * len(prompts)
    k = config.mixed_adapters
    mixed = [LoraRef(f"m{i % k}", paths[i % k]) for i in range(len(prompts))]
    sides = [("base", base), ("mixed", mixed)]
    runs, before = {}, _lora_stats(engine)
    for name, refs in reversed(sides) if swap else sides:
        runs[name] = _closed_loop(engine, prompts, refs, config.output_len, len(prompts))
    return PairResult("mixed", runs["base"], runs["mixed"], _lora_delta(engine, before))


def _zipf(engine, config: LoraBenchConfig, paths, pool, swap: bool) -> PairResult:
    from serve_app.engine.outputs import LoraRef

    n = config.zipf_requests
    prompts = _prompts(pool, n, config.input_len, config.seed + 1)
    picks = zipf_choices(config.zipf_adapters, n, config.zipf_s, config.seed)
    zipf = [LoraRef(f"z{k}", paths[k]) for k in picks]
    one = [LoraRef("z0", paths[0])] * n
    sides = [("single", one), ("zipf", zipf)]
    runs, before = {}, _lora_stats(engine)
    for name, refs in reversed(sides) if swap else sides:
        runs[name] = _closed_loop(engine, prompts, refs, config.output_len, config.concurrency)
    return PairResult("zipf", runs["single"], runs["zipf"], _lora_delta(engine, before))


def _closed_loop(engine, prompts, refs, output_len: int, concurrency: int) -> RunStats:
    """Keep `concurrency` requests in flight (all of them: concurrency >= len(prompts)); TTFT
    from each request's submission (an on-demand adapter load included) to its first token."""
    from serve_app.engine.outputs import EngineRequest
    from serve_app.engine.request import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    stats, pending = RunStats(ttft_s=[]), list(range(len(prompts)))[::-1]
    submitted: dict[str, float] = {}
    produced: dict[str, int] = {}
    t0 = time.perf_counter()

    def submit() -> None:
        while pending and len(submitted) < concurrency:
            i = pending.pop()
            rid = f"lora-bench-{next(_ids)}"
            submitted[rid] = time.perf_counter()
            try:
                engine.add_request(EngineRequest(rid, prompts[i], params, refs[i]))
            except Exception as e:  # noqa: BLE001 - a refused request is what we count
                print(f"    request {i} refused: {e}", file=sys.stderr)
                stats.errors += 1
                del submitted[rid]
                continue
            produced[rid] = 0

    submit()
    while engine.has_unfinished_requests() or pending:
        now_outs = engine.step()
        now = time.perf_counter()
        for out in now_outs:
            if out.new_token_ids and produced[out.request_id] == 0:
                stats.ttft_s.append(now - submitted[out.request_id])
            produced[out.request_id] += len(out.new_token_ids)
            if out.finish_reason is not None:
                if out.finish_reason == "abort" or produced[out.request_id] != output_len:
                    stats.errors += 1
                stats.output_tokens += produced[out.request_id]
                del submitted[out.request_id]
        submit()
    stats.elapsed_s = time.perf_counter() - t0
    return stats


def _warm_up(engine, path: str, name: str) -> None:
    """A few steps on the base model and on one adapter (untimed): first-call costs out."""
    from serve_app.engine.outputs import LoraRef

    prompts = [[1 + i, 2 + i, 3 + i, 4 + i] * 4 for i in range(4)]
    refs = [None, LoraRef(name, path), None, LoraRef(name, path)]
    _closed_loop(engine, prompts, refs, 4, len(prompts))


def _lora_stats(engine) -> dict[str, int]:
    s = engine.stats()
    return {"lora_loads": s.lora_loads, "lora_evictions": s.lora_evictions}


def _lora_delta(engine, before: dict[str, int]) -> dict[str, int]:
    """Adapter loads and evictions during a pair of runs (the single side's included)."""
    return {k: v - before[k] for k, v in _lora_stats(engine).items()}


def _prompts(pool: list[int], n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.choice(pool) for _ in range(length)] for _ in range(n)]


def _token_pool(model_dir: str) -> list[int]:
    from transformers import AutoConfig, AutoTokenizer

    from serve_app.bench.workloads import token_pool

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    return token_pool(vocab, AutoTokenizer.from_pretrained(model_dir).all_special_ids)
