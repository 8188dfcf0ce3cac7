"""Rollouts of a LoRA adapter: two adapter directories behind one public name. Pure.

An adapter rollout is an ordinary rollout (state.py, machine.py, analysis.py, run by a
RolloutController of its own) whose versions are adapter directories instead of model apps:
`Version.model_path` is the PEFT directory. The engines hold each version under its own
internal adapter name, `<public>@<version>`, so both versions can run side by side in one
engine without a reload, and the base model is never redeployed.

The ingress gets an `AdapterSplit` per public name and picks the version of each request
naming it with the same sticky hash as model versions (split.choose_version), salted with the
public name so that two adapter canaries do not put the same sessions on their candidates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from serve_app.engine.outputs import LoraRef
from serve_app.rollout.split import choose_version
from serve_app.rollout.state import RolloutError, RolloutState, Version, Weights

# The request header that pins an adapter version (x-moeserve-version pins model versions).
ADAPTER_PIN_HEADER = "x-moeserve-adapter-version"
SEPARATOR = "@"


def internal_name(public: str, version: str) -> str:
    """The name the engines hold `version` of adapter `public` under."""
    return f"{public}{SEPARATOR}{version}"


@dataclass(frozen=True, slots=True)
class AdapterSplit:
    """What the ingress needs to route requests for one public adapter name.

    weights: as RolloutState.weights (candidate first); refs: each weighted version's engine
    adapter; error_rates: test-only injected failure rates per version (fault_injection).
    """

    public: str
    weights: Weights
    refs: dict[str, LoraRef]
    stable: str
    generation: int
    error_rates: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AdapterChoice:
    """The version that serves one request. retry: a failure before the first token may be
    retried on the stable version (a split request on a non-stable version, not a pinned one).
    error_rate: the version's test-only injected failure rate."""

    version: str
    ref: LoraRef
    stable: str
    stable_ref: LoraRef
    retry: bool
    error_rate: float = 0.0

    def on_stable(self) -> AdapterChoice:
        """The same request on the stable version, as a retry (no further retry)."""
        return AdapterChoice(self.stable, self.stable_ref, self.stable, self.stable_ref, False)


def adapter_split(
    public: str, state: RolloutState, configs: dict[str, dict[str, Any]], generation: int
) -> AdapterSplit:
    """The split of a controller's state: every weighted version with its directory."""
    versions = _versions(state)
    refs = {}
    for name, _ in state.weights:
        refs[name] = LoraRef(internal_name(public, name), versions[name].model_path, 0)
    rates = {}
    for name in refs:
        fault = (configs.get(name) or {}).get("fault_injection") or {}
        if fault.get("error_rate"):
            rates[name] = float(fault["error_rate"])
    return AdapterSplit(public, state.weights, refs, state.stable.name, generation, rates)


def choose_adapter(
    split: AdapterSplit, session_key: str | None, request_id: str, pinned: str | None
) -> AdapterChoice:
    """The version for one request (pinned: the x-moeserve-adapter-version header); an
    unknown pin raises RolloutError."""
    version = choose_version(split.weights, session_key, request_id, pinned, salt=split.public)
    return AdapterChoice(
        version,
        split.refs[version],
        split.stable,
        split.refs[split.stable],
        retry=pinned is None and version != split.stable,
        error_rate=split.error_rates.get(version, 0.0),
    )


def check_version_name(version: str) -> None:
    """A version label that makes a valid internal adapter name."""
    if not version or SEPARATOR in version or ":" in version or version.strip() != version:
        raise RolloutError(
            f"adapter version {version!r}: needs a non-empty name without '@', ':' or spaces"
        )


def _versions(state: RolloutState) -> dict[str, Version]:
    out = {h.version.name: h.version for h in state.history}
    for v in (state.stable, state.candidate, state.retiring):
        if v is not None:
            out[v.name] = v
    return out
