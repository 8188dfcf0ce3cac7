"""The `moeserve` command. Subcommands import their modules lazily so `--help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable


def _lazy(target: str) -> Callable[[argparse.Namespace], int]:
    """A subcommand runner that imports `module:function` only when the command runs."""

    def run(args: argparse.Namespace) -> int:
        module, func = target.split(":")
        return getattr(importlib.import_module(module), func)(args)

    return run


def _add_make_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-model", help="write a small random-weight HF checkpoint + tokenizer")
    p.add_argument("--arch", required=True, choices=["qwen3_moe", "qwen2_moe", "mixtral", "llama"])
    p.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)

    def run(a: argparse.Namespace) -> int:
        from serve_app.tools.make_model import make_model

        path = make_model(a.arch, a.preset, a.out, a.seed)
        print(f"wrote {a.arch}/{a.preset} checkpoint to {path}")
        return 0

    p.set_defaults(func=run)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="run the engine offline on a batch of prompts")
    p.add_argument("--model", required=True, help="checkpoint directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts-file", help="JSON Lines: a string or {'prompt': ...} per line")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="one JSON object per prompt, input order")

    p.set_defaults(func=_lazy("serve_app.tools.generate:run_generate"))


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (not tests): print a table, write JSON + PNG")
    bsub = p.add_subparsers(dest="bench_cmd", required=True)
    e = bsub.add_parser("engine", help="offline throughput vs transformers and vLLM")
    e.add_argument("--model", default="models/qwen3_moe-small")
    e.add_argument("--workloads", default="random,fixed,prefix")
    e.add_argument("--out", default="bench_results")
    e.add_argument("--num-prompts", type=int, default=None, help="override prompt counts")
    e.add_argument("--skip", default="", help="comma list of systems to skip")

    e.set_defaults(func=_lazy("serve_app.bench.engine_bench:run_engine_bench"))
    pc = bsub.add_parser("prefix-cache", help="TTFT: cold vs Redis-shared vs local prefix hit")
    pc.add_argument("--model", default="models/qwen3_moe-small")
    pc.add_argument("--prefix-len", type=int, default=2000)
    pc.add_argument("--suffix-len", type=int, default=16)
    pc.add_argument("--repeats", type=int, default=3)
    pc.add_argument("--redis-url", default=None, help="default: a private embedded redis-server")
    pc.add_argument("--lookup-timeout-ms", type=float, default=10.0)
    pc.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    pc.add_argument("--out", default="bench_results")
    pc.set_defaults(func=_lazy("serve_app.bench.prefix_cache_bench:run_prefix_cache_bench"))


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from serve_app.tools.local_server import add_server_args

    p = sub.add_parser("serve", help="serve a checkpoint behind the OpenAI API in one process")
    add_server_args(p)

    p.set_defaults(func=_lazy("serve_app.tools.local_server:run_server"))
    s = sub.add_parser("stop", help="stop the server that `serve --background` started")

    s.set_defaults(func=_lazy("serve_app.tools.local_server:stop_command"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeserve", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    _add_make_model(sub)
    _add_generate(sub)
    _add_bench(sub)
    _add_serve(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
