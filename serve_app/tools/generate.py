"""`moeserve generate`: offline batch generation from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from serve_app.engine.errors import InvalidRequestError
from serve_app.engine.request import SamplingParams
from serve_app.model.quant.scheme import QuantizationError
from serve_app.runtime.llm import LLM


def read_prompts(path: str) -> list[str]:
    """JSON Lines: each line a JSON string or an object with a `prompt` field."""
    prompts = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        item = json.loads(line)
        if isinstance(item, dict):
            item = item.get("prompt")
        if not isinstance(item, str):
            raise ValueError(f"{path}:{n}: expected a string or an object with a 'prompt' string")
        prompts.append(item)
    return prompts


def run_generate(args: argparse.Namespace) -> int:
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts_file)
    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
        )
        llm = LLM(
            args.model,
            quantization=args.quantization,
            quantization_group_size=args.quantization_group_size,
            dtype=args.dtype,
        )
        results = llm.generate(prompts, params)
    except InvalidRequestError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    except QuantizationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for prompt, res in zip(prompts, results, strict=True):
        choice = res.choices[0]
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt": prompt,
                        "text": choice.text,
                        "token_ids": choice.token_ids,
                        "prompt_token_ids": res.prompt_token_ids,
                        "finish_reason": choice.finish_reason,
                    },
                    ensure_ascii=False,
                )
            )
        else:
            print(f"--- {prompt!r}\n{choice.text}  [{choice.finish_reason}]")
    return 0
