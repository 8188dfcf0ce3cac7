"""Test-only fault injection of a rollout version (`fault_injection` in its config)."""

from __future__ import annotations

from serve_app.engine.errors import EngineError


class InjectedFaultError(EngineError):
    """A failure the version's `fault_injection` asked for (reported as 503, like an outage)."""
