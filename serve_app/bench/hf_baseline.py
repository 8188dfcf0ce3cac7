"""Static-batching baseline: transformers' generate() over fixed batches of the workload.

Batches are taken in workload (arrival) order, unsorted: a naive static batcher does not know
output lengths in advance. Each batch is left-padded with an attention mask and runs until its
longest request is done (min_new_tokens = max_new_tokens forces the length, like ignore_eos);
only the tokens each request asked for are counted, so the padding work shows up as lost
throughput, which is the point of the comparison.
"""

from __future__ import annotations

import gc
import time

import torch
from transformers import AutoModelForCausalLM

from serve_app.bench.config import BenchConfig
from serve_app.bench.result import RunResult, loadavg_1m
from serve_app.bench.workloads import BenchRequest, Workload

SYSTEM = "transformers"


def run_transformers(
    model_dir: str, workloads: list[Workload], warmup: Workload, config: BenchConfig
) -> list[RunResult]:
    dtype = getattr(torch, config.dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    pad_id = model.generation_config.pad_token_id
    pad_id = 0 if pad_id is None else pad_id
    impl = (
        f"static batch {config.hf_batch_size}, unsorted, "
        f"attn={model.config._attn_implementation}, "
        f"experts={getattr(model.config, '_experts_implementation', None)}"
    )
    try:
        _run(model, warmup, config.hf_batch_size, pad_id)
        results = []
        for w in workloads:
            if w.decode_only:  # generate() gives no first-token time: not measured
                continue
            load0 = loadavg_1m()
            t0 = time.perf_counter()
            counted, computed = _run(model, w, config.hf_batch_size, pad_id)
            elapsed = time.perf_counter() - t0
            notes = [impl, f"{computed} tokens generated, {counted} counted"]
            results.append(
                RunResult(SYSTEM, w.name, counted, elapsed, (load0, loadavg_1m()), notes)
            )
        return results
    finally:
        del model
        gc.collect()


@torch.inference_mode()
def _run(model, w: Workload, batch_size: int, pad_id: int) -> tuple[int, int]:
    """Returns (tokens the requests asked for, tokens the batches actually generated)."""
    counted = computed = 0
    for i in range(0, len(w.requests), batch_size):
        batch = w.requests[i : i + batch_size]
        input_ids, mask = left_pad(batch, pad_id)
        steps = max(r.max_tokens for r in batch)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            pad_token_id=pad_id,
        )
        generated = out.shape[1] - input_ids.shape[1]
        if generated != steps:
            raise RuntimeError(f"transformers generated {generated} tokens, expected {steps}")
        counted += sum(r.max_tokens for r in batch)
        computed += generated * len(batch)
    return counted, computed


def left_pad(batch: list[BenchRequest], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] input ids left-padded with pad_id, and the matching attention mask."""
    width = max(len(r.prompt_token_ids) for r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, r in enumerate(batch):
        n = len(r.prompt_token_ids)
        ids[row, width - n :] = torch.tensor(r.prompt_token_ids)
        mask[row, width - n :] = 1
    return ids, mask
