"""When to stop waiting for a version's Serve application to start (pure; actor.py polls).

A version whose replicas no node can host would otherwise wait for ever (Serve keeps them
pending); the rollout instead fails with one line that names what is missing and the fix. Serve
itself reports a replica pending allocation in its deployment status message, after
RAY_SERVE_SLOW_STARTUP_WARNING_S (30 s); anything else gets deploy_timeout_s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Serve 2.60's message for a replica that cannot be placed (deployment_state.py).
_UNSCHEDULED = re.compile(
    r"Deployment '(?P<deployment>[^']+)'.*to be scheduled.*"
    r"Resources required for each replica: (?P<required>.+?), "
    r"total resources available: (?P<available>.+?)\. Use",
    re.S,
)
FIX = (
    "lower router.num_cpus / router.num_gpus / router.resources in the candidate's config "
    "(router.num_cpus: 0 shares the CPUs the stable version reserved), or add a node with them"
)


@dataclass(frozen=True, slots=True)
class AppSnapshot:
    """What serve.status() says about one application."""

    status: str  # Serve's ApplicationStatus: DEPLOYING, RUNNING, DEPLOY_FAILED, ...
    message: str = ""
    deployment_messages: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DeployVerdict:
    ready: bool = False
    error: str | None = None  # set: give up, with this one-line reason

    @property
    def waiting(self) -> bool:
        return not self.ready and self.error is None


def deploy_verdict(snap: AppSnapshot | None, elapsed_s: float, timeout_s: float) -> DeployVerdict:
    if snap is not None and snap.status == "RUNNING":
        return DeployVerdict(ready=True)
    if snap is not None and snap.status in ("DEPLOY_FAILED", "UNHEALTHY"):
        why = snap.message or "; ".join(m for m in snap.deployment_messages if m)
        return DeployVerdict(error=f"Serve reports {snap.status}: {_one_line(why)}")
    for message in snap.deployment_messages if snap is not None else ():
        m = _UNSCHEDULED.search(message or "")
        if m:
            return DeployVerdict(
                error=f"its {m['deployment']} replicas need {m['required']} each and the "
                f"cluster has {m['available']} free: {FIX}"
            )
    if elapsed_s >= timeout_s:
        last = "; ".join(m for m in snap.deployment_messages if m) if snap is not None else ""
        state = snap.status if snap is not None else "not created"
        return DeployVerdict(
            error=f"not running after {timeout_s:.0f} s (rollout.deploy_timeout_s), Serve says "
            f"{state}{': ' + _one_line(last) if last else ''}"
        )
    return DeployVerdict()


def _one_line(text: str) -> str:
    return " ".join(text.split())
