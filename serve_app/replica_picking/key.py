"""The routing key of a request, computed where the prompt is tokenized (the ingress).

The block hashes are the engine's own (serve_app.engine.block_hash with the version's model
digest, seed and block size), so "replica r was sent block h" means r's prefix cache was
filled under the very key h. Only the leading max_blocks are hashed: the longest prefix worth
matching, and a bound on the work per request.

An adapter request's hashes chain from a root of its adapter's name and revision
(adapter_route_root), as the engine chains them from adapter_root of the adapter's content
digest: its blocks never meet the base model's or another adapter's here either. The ingress
knows the catalog's (name, revision), not the digest, so these keys differ from the engine's
own for adapter requests; they only have to agree with each other (a new revision is a new
adapter here, as a new digest is there).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from serve_app.engine.block_hash import extend_block_hashes, root_hash
from serve_app.engine.outputs import LoraRef
from serve_app.messages import RouterInfo
from serve_app.replica_picking.adapters import AdapterKey
from serve_app.replica_picking.affinity import RouteRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HashNamespace:
    """How one model version hashes its blocks (Router.info reports it)."""

    root: bytes
    block_size: int
    max_blocks: int

    @classmethod
    def of_version(cls, info: RouterInfo) -> HashNamespace | None:
        """From a router's info(); None when that version routes by pow2 (no key needed)."""
        if info.routing != "prefix_affinity":
            return None
        return cls(
            root_hash(info.prefix_hash_seed, info.digest), info.block_size, info.route_key_blocks
        )


def adapter_route_root(root: bytes, adapter: AdapterKey) -> bytes:
    return hashlib.sha256(
        root + b"lora-route:" + adapter.name.encode() + b"@" + str(adapter.revision).encode()
    ).digest()


def route_request(
    token_ids: Sequence[int],
    ns: HashNamespace,
    session_key: str | None,
    request_id: str,
    lora: LoraRef | None = None,
) -> RouteRequest:
    adapter = AdapterKey(lora.name, lora.revision, lora.pinned) if lora is not None else None
    root = adapter_route_root(ns.root, adapter) if adapter else ns.root
    ids = token_ids[: ns.max_blocks * ns.block_size]
    hashes = extend_block_hashes([], ids, ns.block_size, root)
    return RouteRequest(tuple(hashes), session_key, request_id, adapter)


class RouteKeys:
    """The ingress's side: the `route` keyword for a call to one version's routers.

    Each version's HashNamespace is asked of its routers once (info()), cached per handle (a
    version redeployed under the same name gets a new handle; when info() fails, the request
    goes without a key and it is asked again next time). The prompt comes as token ids (the
    front end tokenized it, once); ids the engine would refuse give no key (the engine
    answers the 4xx).
    """

    def __init__(self) -> None:
        self._namespaces: dict[str, tuple[Any, HashNamespace | None]] = {}

    async def kwargs(
        self,
        version: str,
        handle: Any,
        ids: list[int],
        session: str | None,
        rid: str,
        lora: LoraRef | None = None,
    ) -> dict[str, RouteRequest]:
        cached = self._namespaces.get(version)
        if cached is None or cached[0] is not handle:
            try:
                info = await handle.info.remote()
            except Exception as e:  # noqa: BLE001 - no key this time; the call itself may work
                log.warning("no routing key for version %s: info() failed: %s", version, e)
                return {}
            cached = (handle, HashNamespace.of_version(info))
            self._namespaces[version] = cached
        ns = cached[1]
        if ns is None:
            return {}
        if not all(isinstance(t, int) and 0 <= t < 2**32 for t in ids):
            return {}
        return {"route": route_request(ids, ns, session, rid, lora)}
