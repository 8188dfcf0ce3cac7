"""The ingress's admin unload (RouterCore.unload_adapter, no cluster): one call per live model
version with the revision the catalog served, the stable version first; a failure there is the
caller's, a failure on another version is logged (its replicas evict the adapter by LRU)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from serve_app.deployments.ingress import RouterCore
from serve_app.engine.outputs import LoraRef
from serve_app.lora.unloads import Unload


class _Handle:
    def __init__(self, calls: list, version: str, fails: bool):
        self.calls, self.version, self.fails = calls, version, fails
        self.unload_adapter = self  # handle.unload_adapter.remote(...)

    def remote(self, unload: Unload):
        async def call():
            self.calls.append((self.version, unload))
            if self.fails:
                raise RuntimeError(f"{self.version} is gone")
            return True

        return call()


def _core(stable: str, apps: dict, failing: set[str] = frozenset()) -> tuple[RouterCore, list]:
    calls: list = []
    handles = {v: _Handle(calls, v, v in failing) for v in apps}
    split = SimpleNamespace(apps=apps)
    versions = SimpleNamespace(stable=stable, split=split, handle=handles.__getitem__)
    return RouterCore(versions, inbox=None), calls


def test_an_unload_goes_to_every_live_version_stable_first():
    core, calls = _core("v2", {"v1": None, "v2": "app-v2"})
    asyncio.run(core.unload_adapter(LoraRef("sql", "/a/sql", 4, True)))
    assert calls == [("v2", Unload("sql", 4)), ("v1", Unload("sql", 4))]


def test_a_failure_is_raised_on_the_stable_version_only(caplog):
    core, calls = _core("v1", {"v1": None, "v2": "app-v2"}, failing={"v2"})
    asyncio.run(core.unload_adapter(LoraRef("sql", "/a/sql", 0)))
    assert len(calls) == 2 and "unload of sql on version v2 failed" in caplog.text
    core, _ = _core("v1", {"v1": None}, failing={"v1"})
    with pytest.raises(RuntimeError, match="v1 is gone"):
        asyncio.run(core.unload_adapter(LoraRef("sql", "/a/sql", 0)))
