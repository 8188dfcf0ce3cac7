"""Blue-green and canary rollouts: pure state, verdicts, transitions and traffic split.

No Ray, no Redis, no HTTP here: the ingress, the state store and the CLI are adapters around
these functions (see docs/rollouts.md for what is built).
"""
