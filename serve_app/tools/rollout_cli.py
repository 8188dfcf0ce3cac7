"""`moeserve rollout start|status|promote|pause|resume|abort|undo`: the operator's commands.

Each connects to the Ray cluster as a driver (`--address`, default $RAY_ADDRESS or the local
cluster) and talks to the app's rollout controller actor (deployments/rollout_actor.py). A candidate
config is validated here, before anything is deployed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from serve_app.config import AppConfig
from serve_app.rollout.state import ACTIVE_PHASES, RolloutError

WATCH_S = 2.0


def run_rollout(args: argparse.Namespace) -> int:
    try:
        if args.rollout_cmd == "start":
            # validated before connecting to anything
            call = _adapter_start_call(args) if args.adapter else _start_call(args)
        controller = _connect(args.address, args.app)
        if args.rollout_cmd == "start" and not args.adapter:
            timeout = call["config"]["rollout"]["deploy_timeout_s"]
            print(
                f"deploying {call['version']} (waiting for its replicas, at most {timeout:.0f} s; "
                "`moeserve rollout abort` stops it)",
                file=sys.stderr,
                flush=True,
            )
        status = _dispatch(controller, args, call if args.rollout_cmd == "start" else None)
    except (RolloutError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if "error" in status:
        print(f"error: {status['error']}", file=sys.stderr)
        return 1
    _show(status, args.json)
    if args.rollout_cmd == "status" and args.watch:
        return _watch(controller, args.json, args.adapter)
    return 0


def _dispatch(controller, args: argparse.Namespace, call: dict | None) -> dict[str, Any]:
    import ray

    cmd, adapter = args.rollout_cmd, args.adapter
    target = {"adapter": adapter} if adapter else {}  # no keyword: an older controller works
    if cmd == "start":
        ref = (controller.start_adapter if adapter else controller.start).remote(**call)
    elif cmd == "promote":
        ref = controller.promote.remote(args.full, **target)
    elif cmd == "undo":
        ref = controller.undo.remote(args.to_version, **target)
    else:
        ref = getattr(controller, cmd).remote(**target)
    return ray.get(ref)


def load_candidate(path: str, app: str, version: str | None) -> AppConfig:
    """The candidate's AppConfig from a YAML file: plain app args, or a Serve config whose
    application `app` (else its only one) holds them. Relative model paths resolve here."""
    raw = yaml.safe_load(Path(path).read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a YAML mapping")
    if "applications" in raw:
        apps = raw["applications"]
        chosen = [a for a in apps if a.get("name") == app] or (apps if len(apps) == 1 else [])
        if not chosen:
            raise ValueError(f"{path}: no application named {app!r}")
        raw = chosen[0].get("args", {})
    if version:
        raw = {**raw, "version": version}
    config = AppConfig.model_validate(raw)
    model = Path(config.model).expanduser()
    if not model.is_absolute():
        if not (model / "config.json").is_file():
            raise ValueError(f"model {config.model!r} is not a checkpoint directory here")
        config = config.model_copy(update={"model": str(model.resolve())})
    return config


def _strategy_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The rollout settings `rollout start`'s flags override (those given)."""
    updates: dict[str, Any] = {}
    if args.strategy:
        updates["strategy"] = args.strategy
    if args.steps:
        updates["steps"] = [int(x) for x in args.steps.split(",") if x.strip()]
    if args.interval:
        updates["interval_s"] = parse_duration(args.interval)
    if args.manual:
        updates["auto"] = False
    return updates


def _strategy_body(r) -> dict[str, Any]:
    """The strategy and analysis gates of RolloutSettings `r`, as the controller takes them."""
    strategy = r.strategy_config()
    return {
        "strategy": {
            "kind": strategy.kind,
            "steps": list(strategy.steps),
            "interval_s": strategy.interval_s,
            "auto": strategy.auto,
        },
        "analysis": r.analysis.model_dump(),
    }


def _start_call(args: argparse.Namespace) -> dict[str, Any]:
    config = load_candidate(args.config, args.app, args.version_name)
    r = config.rollout
    updates = _strategy_flags(args)
    r = type(r).model_validate({**r.model_dump(), **updates})
    return {
        "version": config.version_name,
        "config": config.model_dump(),
        **_strategy_body(r),
    }


def _adapter_start_call(args: argparse.Namespace) -> dict[str, Any]:
    """`rollout start --adapter NAME DIR`: the strategy of the flags over RolloutSettings'
    defaults; the directory must hold a PEFT adapter here (the engines load it by this path)."""
    from serve_app.config import RolloutSettings
    from serve_app.rollout.adapter import check_version_name
    from serve_app.rollout.adapter_controllers import default_version_name

    path = Path(args.config).expanduser().resolve()
    if not (path / "adapter_config.json").is_file():
        raise ValueError(f"{args.config}: not a PEFT adapter directory (no adapter_config.json)")
    version = args.version_name or default_version_name(str(path))
    check_version_name(version)
    updates = _strategy_flags(args)
    r = RolloutSettings.model_validate(updates)
    stable = str(Path(args.stable_path).expanduser().resolve()) if args.stable_path else None
    return {
        "adapter": args.adapter,
        "version": version,
        "config": {"model": str(path)},
        **_strategy_body(r),
        "stable_path": stable,
    }


def parse_duration(text: str) -> float:
    """'90', '90s', '5m', '1h' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    text = text.strip().lower()
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 5m)") from None


def _connect(address: str | None, app: str):
    from serve_app.tools.run_files import local_ray_address

    address = address or os.environ.get("RAY_ADDRESS") or local_ray_address() or "auto"
    # NOTE: Ray 2.60 turns token auth on for every local `ray.init()` cluster (make run's), but
    # a driver that joins one sends its token only in token mode; the CLI would then be
    # refused. Join in token mode when a token is there, as `ray` itself does on start.
    has_token = os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray/auth_token").is_file()
    if has_token:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray  # after RAY_AUTH_MODE: Ray reads it once

    from serve_app.deployments.rollout_actor import NAMESPACE, get_controller

    try:
        ray.init(
            address=address,
            namespace=NAMESPACE,
            log_to_driver=False,
            logging_level="ERROR",
            configure_logging=False,
        )
    except ConnectionError as e:
        raise ValueError(f"cannot reach a Ray cluster at {address!r}: {e}") from None
    return get_controller(app)


def _watch(controller, as_json: bool, adapter: str | None = None) -> int:
    import ray

    target = {"adapter": adapter} if adapter else {}
    try:
        while True:
            time.sleep(WATCH_S)
            status = ray.get(controller.status.remote(**target))
            print()
            _show(status, as_json)
            if status["state"]["phase"] not in ACTIVE_PHASES:
                return 0
    except KeyboardInterrupt:
        return 0


def _show(status: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return
    print(format_status(status))


def format_status(status: dict[str, Any]) -> str:
    s = status["state"]
    weights = dict((n, w) for n, w in s["weights"])
    cand = (s["candidate"] or {}).get("name")
    strategy = s["strategy"]
    head = f"phase {s['phase']}"
    if status.get("adapter"):
        head = f"adapter {status['adapter']} | {head}"
    if strategy and cand:
        steps = strategy["steps"]
        head += f" | {strategy['kind']}"
        if strategy["kind"] == "canary":
            head += f" step {s['step_index'] + 1}/{len(steps)} ({steps[s['step_index']]}%)"
    if s["last_verdict"]:
        head += f" | last analysis: {s['last_verdict']}"
    digests = {h["version"]["name"]: h["version"]["digest"] for h in s["history"]}
    for v in (s["candidate"], s["retiring"], s["stable"]):
        if v:
            digests[v["name"]] = v["digest"]
    rows = [("VERSION", "ROLE", "WEIGHT", "REQS", "ERRORS", "TTFT_P99", "E2E_P99", "APP", "DIGEST")]
    for name, m in status["metrics"].items():
        role = (
            "stable"
            if name == s["stable"]["name"]
            else "candidate"
            if name == cand
            else "retiring"
            if name == (s["retiring"] or {}).get("name")
            else "-"
        )
        rows.append(
            (
                name,
                role,
                f"{weights.get(name, 0)}%",
                str(m["requests"]),
                f"{m['error_rate']:.1%}",
                _ms(m["ttft_p99_ms"]),
                _ms(m["e2e_p99_ms"]),
                status["apps"].get(name) or "(base)",
                (digests.get(name) or "-")[:19],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )
    history = " -> ".join(h["version"]["name"] for h in s["history"])
    lines = [head, table, f"reason: {s['reason']}", f"history: {history}"]
    if status.get("deploying"):
        lines.append(f"deploying: {status['deploying']} (its replicas are starting)")
    if status.get("cancelled"):
        lines.append(f"cancelled: the deploy of {status['cancelled']}; its app is deleted")
    if status["rollbacks"]:
        lines.append(f"rollbacks: {status['rollbacks']}")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}ms"
