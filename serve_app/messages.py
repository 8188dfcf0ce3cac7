"""The typed messages between Serve deployments and actors (what crosses a Ray call).

Frozen slots dataclasses, read by attribute: no string-keyed dicts, no positional lists.
- RouterInfo: what a router replica says about itself (Router.info), read by the ingress
  (context length, the version's digest) and by its routing key (the hash namespace).
- Refused: Router.generate_to's result when the request was refused before any output (the
  ingress answers 4xx / 503 with it).
- PlacementReport: a router replica's periodic report to the expert balancer; the balancer
  answers a Versioned placement (serve_app/experts/balancer.py) to register and to it.
No Ray here: the deployments send these, everything below them reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from serve_app.engine.errors import EngineError
from serve_app.experts.balancer import Versioned


@dataclass(frozen=True, slots=True)
class RouterInfo:
    max_model_len: int
    expert_parallel_size: int
    node_id: str  # where Ray placed this replica
    digest: str  # the exact weights (and KV layout) this version serves
    # How the ingress computes the routing key (serve_app.replica_picking.key.HashNamespace):
    routing: str  # router.routing: pow2 | prefix_affinity
    block_size: int
    prefix_hash_seed: int
    route_key_blocks: int


@dataclass(frozen=True, slots=True)
class Refused:
    """The request was refused before its first output; nothing of it runs."""

    error: EngineError


@dataclass(frozen=True, slots=True)
class PlacementReport:
    """A router replica's cumulative expert tokens and the placement it dispatches by; the
    shard actor handles it resolved (None: being recreated) let the balancer reach them."""

    router: str  # the replica's id
    expert_tokens: tuple[int, ...]
    used: Versioned
    shard_handles: tuple[Any, ...]
