"""Our engine under test: offline LLM.generate with every request submitted at once."""

from __future__ import annotations

import gc
import time

from serve_app.bench.config import BenchConfig
from serve_app.bench.result import RunResult, loadavg_1m
from serve_app.bench.workloads import Workload
from serve_app.engine.request import SamplingParams
from serve_app.runtime.llm import LLM

SYSTEM = "moeserve"


def run_moeserve(
    model_dir: str, workloads: list[Workload], warmup: Workload, config: BenchConfig
) -> list[RunResult]:
    """Load once (untimed), warm up, then time each workload's generate() end to end."""
    llm = LLM(
        model_dir,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_model_len=config.max_model_len,
        dtype=config.dtype,
        quantization=config.quantization,
        quantization_group_size=config.quantization_group_size,
    )
    try:
        _generate(llm, warmup)
        results = []
        for w in workloads:
            before = llm.engine.stats()
            load0 = loadavg_1m()
            t0 = time.perf_counter()
            produced = _generate(llm, w)
            elapsed = time.perf_counter() - t0
            after = llm.engine.stats()
            notes = _check_lengths(w, produced)
            queried = after.prefix_queried_tokens - before.prefix_queried_tokens
            hits = after.prefix_hit_tokens - before.prefix_hit_tokens
            notes.append(f"prefix cache hits {hits}/{queried} prompt tokens")
            preempted = after.num_preemptions - before.num_preemptions
            if preempted:
                notes.append(f"{preempted} preemptions")
            results.append(
                RunResult(
                    SYSTEM,
                    w.name,
                    sum(produced),
                    elapsed,
                    (load0, loadavg_1m()),
                    notes,
                )
            )
        return results
    finally:
        del llm
        gc.collect()


def _generate(llm: LLM, w: Workload) -> list[int]:
    prompts = [r.prompt_token_ids for r in w.requests]
    params = [
        SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True)
        for r in w.requests
    ]
    outs = llm.generate(prompts, params)
    return [len(o.choices[0].token_ids) for o in outs]


def _check_lengths(w: Workload, produced: list[int]) -> list[str]:
    """ignore_eos makes every length exact; a mismatch is an engine bug worth flagging."""
    short = sum(1 for r, n in zip(w.requests, produced, strict=True) if n != r.max_tokens)
    return [f"{short} requests produced a different token count than asked"] if short else []
