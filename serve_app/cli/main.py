"""The `moeserve` command: every subcommand's parser, here in one place.

Subcommands import their modules lazily (`module:function`), so `--help` stays fast and the
command imports nothing of Ray or torch until a subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from serve_app.engine.config import DTYPES  # stdlib only
from serve_app.kvstore.settings import WRITE_POLICIES  # stdlib only: keeps `--help` fast
from serve_app.model.quant.methods import GROUP_SIZES, METHODS  # stdlib only


def _lazy(target: str) -> Callable[[argparse.Namespace], int]:
    """A subcommand runner that imports `module:function` only when the command runs."""

    def run(args: argparse.Namespace) -> int:
        module, func = target.split(":")
        return getattr(importlib.import_module(module), func)(args)

    return run


def _add_make_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-model", help="write a small random-weight HF checkpoint + tokenizer")
    archs = ["qwen3_moe", "qwen2_moe", "mixtral", "llama", "deepseek_v3", "deepseek_v2"]
    p.add_argument("--arch", required=True, choices=archs)
    # medium: benchmarks only (~1.3B parameters, 5 GB in fp32; docs/benchmarks.md)
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "medium"])
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
    _add_quantization(p)

    p.set_defaults(func=_lazy("serve_app.tools.generate:run_generate"))


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (not tests): print a table, write JSON + PNG")
    bsub = p.add_subparsers(dest="bench_cmd", required=True)
    e = bsub.add_parser("engine", help="offline throughput vs transformers and vLLM")
    e.add_argument("--model", default="models/qwen3_moe-small")
    e.add_argument(
        "--workloads",
        default="random,fixed,prefix",
        help="comma list of random, fixed, prefix, decode (decode: one row per --decode-batches)",
    )
    e.add_argument("--out", default="bench_results")
    e.add_argument("--num-prompts", type=int, default=None, help="override prompt counts")
    e.add_argument("--skip", default="", help="comma list of systems to skip")
    e.add_argument(
        "--repeat", type=int, default=1, help="rounds of every system in turn (median shown)"
    )
    _add_quantization(e, "moeserve's weights", dtype=False)
    e.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),  # serve_app.bench.config.BENCH_DTYPES
        default="float32",
        help="float dtype of moeserve's (and transformers') weights and activations, and "
        "vLLM's --dtype unless --vllm-dtype says otherwise",
    )
    e.add_argument(
        "--modes",
        default=None,
        help="comma list of moeserve weight modes run in turn, e.g. fp32,bf16,int8,int4 (or "
        "bf16+int8): one table with each mode's ratio over the first and over vLLM "
        "(transformers not run); replaces --quantization",
    )
    e.add_argument(
        "--vllm-dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="vLLM's --dtype (default: --dtype); vLLM on CPU does not quantize at load",
    )
    e.add_argument(
        "--vllm-model",
        default=None,
        help="checkpoint for vLLM, passed as is (e.g. a pre-quantized AWQ / GPTQ / W8A8 one); "
        "default: --model",
    )
    e.add_argument("--decode-batches", default="1,8,64", help="decode workload: batch sizes")
    e.add_argument("--decode-output-len", type=int, default=256, help="decode workload: tokens out")
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

    s = bsub.add_parser("serve", help="TTFT / TPOT / tok/s of OpenAI servers under N streams")
    s.add_argument("--model", required=True, help="checkpoint directory (launched targets)")
    s.add_argument("--tokenizer", default=None, help="for the random prompts; default: --model")
    # --url and --launch share one list, so targets keep their command-line order (the
    # first is the ratios' baseline). Default: --launch inproc moeserve-ep0 moeserve-ep2 vllm.
    s.add_argument(
        "--url",
        dest="targets",
        action="append",
        type=lambda v: ("url", v),
        metavar="LABEL=URL",
        help="a running server (repeatable)",
    )
    s.add_argument(
        "--launch",
        dest="targets",
        action="append",
        type=lambda v: ("launch", v),
        metavar="NAME",
        help="start, measure, stop: moeserve, moeserve-epN, vllm, inproc or inproc-local "
        "(repeatable)",
    )
    s.add_argument("--concurrency", default="1,8,32", help="comma list: one pass per level")
    s.add_argument("--num-prompts", type=int, default=64)
    s.add_argument("--input-len", type=int, default=128)
    s.add_argument("--output-len", type=int, default=64)
    s.add_argument("--warmup", type=int, default=4, help="uncounted requests per target")
    s.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of every target in turn; each goal's ratio is then summarised over them "
        "(median, range, rounds met) in serve_bench_rounds.{json,png}",
    )
    s.add_argument(
        "--serve-args",
        default="",
        help="extra flags for every launched `moeserve serve`, e.g. '--stream-interval 4'",
    )
    _add_write_policy(s, "for inproc and every launched moeserve")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="bench_results")

    s.set_defaults(func=_lazy("serve_app.bench.serve_bench:run_serve_bench"))
    r = bsub.add_parser("routing", help="pow2 vs prefix_affinity over router replicas")
    r.add_argument("--model", default="models/qwen3_moe-small")
    r.add_argument("--modes", default="pow2,prefix_affinity", help="comma list, run in order")
    r.add_argument("--replicas", type=int, default=2, help="router replicas")
    r.add_argument("--prefixes", type=int, default=8, help="shared prefixes")
    r.add_argument("--prefix-len", type=int, default=500, help="tokens per prefix")
    r.add_argument("--suffix-len", type=int, default=16, help="tokens after it, per request")
    r.add_argument("--requests-per-prefix", type=int, default=8)
    r.add_argument("--concurrency", type=int, default=4)
    r.add_argument("--output-len", type=int, default=8)
    r.add_argument("--router-cpus", type=float, default=1.0, help="CPUs per router replica")
    _add_write_policy(r, "for every router replica")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument(
        "--adapters", type=int, default=0, help="random LoRA adapters; each request runs one"
    )
    r.add_argument("--max-loras", type=int, default=8, help="adapters held per router replica")
    r.add_argument("--out", default="bench_results")
    r.set_defaults(func=_lazy("serve_app.bench.routing_bench:run_routing_bench"))

    _add_bench_lora(bsub)
    t = bsub.add_parser(
        "transport",
        help="router -> expert-shard round trip over Ray transports and the expert channel",
    )
    t.add_argument("--tokens", default="1,8,32,128,512", help="comma list of tokens per shard")
    t.add_argument("--iters", type=int, default=300, help="timed round trips per cell")
    t.add_argument("--warmup", type=int, default=50)
    t.add_argument("--shards", type=int, default=2, help="expert-shard actors")
    t.add_argument(
        "--transports",
        default="actor_torch,actor_numpy,cgraph_torch,cgraph_numpy,channel",
    )
    t.add_argument("--out", default="bench_results")

    t.set_defaults(func=_lazy("serve_app.bench.transport:run_transport_bench"))


def _add_bench_lora(bsub: argparse._SubParsersAction) -> None:
    b = bsub.add_parser(
        "lora", help="many LoRA adapters in-process: mixed vs base tok/s, Zipf P99 TTFT"
    )
    b.add_argument("--model", default="models/qwen3_moe-small")
    b.add_argument("--workloads", default="mixed,zipf", help="comma list of mixed, zipf")
    b.add_argument("--num-prompts", type=int, default=64, help="mixed: prompts per run")
    b.add_argument("--input-len", type=int, default=128, help="prompt tokens")
    b.add_argument("--output-len", type=int, default=32, help="tokens out per request")
    b.add_argument("--mixed-adapters", type=int, default=8, help="mixed: adapters, uniform")
    b.add_argument("--zipf-adapters", type=int, default=200, help="zipf: adapters registered")
    b.add_argument("--zipf-requests", type=int, default=400, help="zipf: requests per run")
    b.add_argument("--zipf-s", type=float, default=1.0, help="zipf: the popularity exponent")
    b.add_argument("--concurrency", type=int, default=16, help="zipf: requests in flight")
    b.add_argument("--max-loras", type=int, default=16, help="zipf: adapters held (LRU)")
    b.add_argument(
        "--max-loras-per-batch", type=int, default=None, help="the engine's per-step cap"
    )
    b.add_argument("--rank", type=int, default=16, help="adapter rank (q_proj, v_proj)")
    b.add_argument(
        "--repeat", type=int, default=1, help="rounds of both workloads; each round's ratio"
    )
    b.add_argument(
        "--adapter-dir", default="bench_results/lora_adapters", help="adapters (made once)"
    )
    b.add_argument("--no-bandwidth", action="store_true", help="skip the memory-bandwidth probe")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", default="bench_results")
    b.set_defaults(func=_lazy("serve_app.bench.lora_bench:run_lora_bench"))


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a checkpoint behind the OpenAI API in one process")
    _add_server_args(p)

    p.set_defaults(func=_lazy("serve_app.tools.local_server:run_server"))
    s = sub.add_parser("stop", help="stop the server that `serve --background` started")

    s.set_defaults(func=_lazy("serve_app.tools.local_server:stop_command"))


def _add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--served-model-name", default=None, help="default: the directory's name")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-memory-gb", type=float, default=1.0)
    _add_quantization(p)
    p.add_argument(
        "--lora",
        action="append",
        type=_lora_arg,
        metavar="NAME=DIR",
        help="serve the PEFT LoRA adapter in DIR as model NAME (repeatable; docs/lora.md)",
    )
    p.add_argument(
        "--max-loras", type=int, default=8, help="LoRA adapters held per engine (LRU evicted)"
    )
    p.add_argument(
        "--max-loras-per-batch",
        type=int,
        default=None,
        help="distinct LoRA adapters in one engine step, at most --max-loras (default: no cap); "
        "a request over it waits its turn (docs/lora.md)",
    )
    p.add_argument(
        "--max-cpu-loras",
        type=int,
        default=None,
        help="LoRA adapters kept in host memory, resident ones included (default: 2 x "
        "--max-loras); an evicted one among them is reloaded without a disk read",
    )
    p.add_argument(
        "--max-lora-memory-gb",
        type=float,
        default=None,
        help="GiB the resident LoRA adapters may take, out of the KV pool's memory (default, "
        "with --lora: --max-loras x the largest adapter allowed, at most half the pool; "
        "docs/lora.md, Memory)",
    )
    p.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="tokens per streamed chunk after the first (vLLM's --stream-interval)",
    )
    p.add_argument(
        "--unknown-fields",
        choices=("reject", "ignore"),
        default="reject",
        help="a request field the server does not know: 400 naming it (reject, as OpenAI) or "
        "dropped (ignore, as vLLM)",
    )
    p.add_argument(
        "--serve-mode",
        choices=("throughput", "standard"),  # serve_app.tools.ray_server.SERVE_MODES
        default="throughput",
        help="--ray: `throughput`: HTTP through HAProxy straight to the ingress replica and "
        "Serve's throughput-optimized settings; `standard`: Serve's proxy actor and defaults",
    )
    p.add_argument("--background", action="store_true", help="detach and return when ready")
    ray = p.add_argument_group("Ray Serve (--ray)")
    ray.add_argument(
        "--ray", action="store_true", help="start a local Ray and serve the Serve app on it"
    )
    ray.add_argument("--ep", type=int, default=0, help="expert_parallel_size (0: in-process)")
    ray.add_argument("--routers", type=int, default=1, help="router replicas")
    ray.add_argument(
        "--routing",
        choices=("pow2", "prefix_affinity"),
        default="pow2",
        help="how a request picks a router replica (router.routing; docs/routing.md)",
    )
    ray.add_argument(
        "--redis-url",
        default=None,
        help="Redis for the shared prefix cache (default: $MOESERVE_REDIS_URL, else embedded)",
    )
    _add_write_policy(ray, "for this app")
    ray.add_argument("--dashboard", action="store_true", help="also start the Ray dashboard")
    ray.add_argument("--dashboard-port", type=int, default=8265)


def _lora_arg(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path or ":" in name:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {value!r}")
    return name, path


def _add_quantization(
    p: argparse.ArgumentParser, what: str = "the weights", dtype: bool = True
) -> None:
    """--quantization and its group size, and (dtype) the engine's --dtype."""
    if dtype:
        _add_dtype(p)
    p.add_argument(
        "--quantization",
        choices=METHODS,
        default="none",
        help=f"quantize {what} at load: int8 per output channel, int4 in groups along the "
        "input (the MoE gates, norms, embeddings and LM head stay float; README). A "
        "pre-quantized checkpoint (GPTQ, AWQ, compressed-tensors) is served as it is with none",
    )
    p.add_argument(
        "--quantization-group-size",
        type=int,
        choices=GROUP_SIZES,
        default=None,
        help="int4 group size (default: 128, or the largest of 64 / 32 dividing the input size)",
    )


def _add_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="engine dtype (auto: bfloat16 on CUDA, float32 on CPU). bfloat16 on the CPU holds "
        "the weights in bf16 and computes in float32 (docs/quantization.md)",
    )


def _add_write_policy(p: argparse.ArgumentParser | argparse._ArgumentGroup, scope: str) -> None:
    p.add_argument(
        "--prefix-write-policy",
        choices=WRITE_POLICIES,
        default=None,
        help=f"the shared prefix cache's write policy {scope}: write_through sends a KV block "
        "to Redis once computed, write_through_selective once this replica reuses it "
        "(default: the app config's prefix_cache.write_policy; README)",
    )


def _add_rollout(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rollout", help="canary / blue-green rollout of a new model version")
    rsub = p.add_subparsers(dest="rollout_cmd", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        c = rsub.add_parser(name, help=help)
        c.add_argument(
            "--address",
            default=None,
            help="Ray address; default: $RAY_ADDRESS, else the Ray of `make run`, else auto",
        )
        c.add_argument("--app", default="moeserve", help="the Serve application (moeserve)")
        c.add_argument("--json", action="store_true", help="print the status as JSON")
        c.add_argument(
            "--adapter",
            default=None,
            help="act on the rollout of this LoRA adapter name instead of the model's "
            "(docs/lora.md)",
        )
        return c

    s = command("start", "deploy a candidate version and start moving traffic to it")
    s.add_argument(
        "config",
        help="the candidate's app config (YAML; a Serve config works too); with --adapter, "
        "the new adapter's PEFT directory",
    )
    s.add_argument("--version", dest="version_name", help="version name (default: config's)")
    s.add_argument(
        "--from",
        dest="stable_path",
        default=None,
        help="with --adapter, on its first rollout: the directory the adapter is served from "
        "now (default: the app config's lora.adapters entry)",
    )
    s.add_argument("--strategy", choices=["canary", "bluegreen"], default=None)
    s.add_argument("--steps", default=None, help="canary percents, e.g. 5,25,50,100")
    s.add_argument("--interval", default=None, help="least time per step, e.g. 60s, 5m")
    s.add_argument("--manual", action="store_true", help="wait for promote after each step")
    w = command("status", "versions, weights and analysis results")
    w.add_argument("--watch", action="store_true", help="refresh until the rollout ends")
    pr = command("promote", "next canary step (or the blue-green switch)")
    pr.add_argument("--full", action="store_true", help="straight to 100%%")
    command("pause", "stop stepping (analysis and rollback keep running)")
    command("resume", "go on stepping")
    command("abort", "all traffic back to the stable version")
    u = command("undo", "make an earlier version stable again")
    u.add_argument("--to", dest="to_version", default=None, help="version (default: previous)")
    p.set_defaults(func=_lazy("serve_app.tools.rollout_cli:run_rollout"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeserve", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    _add_make_model(sub)
    _add_generate(sub)
    _add_bench(sub)
    _add_serve(sub)
    _add_rollout(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
