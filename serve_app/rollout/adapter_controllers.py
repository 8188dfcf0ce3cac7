"""The rollout controllers of an app's LoRA adapters: one RolloutController per public adapter
name, the same one that rolls out model versions (its machine, analysis gates, automatic
rollback, undo), with a Deployer whose "deploy" checks the adapter directory instead of
starting replicas. Plain Python; the Ray actor (deployments/rollout_actor.py) hosts it.

A name gets its controller on its first rollout, with the directory it is served from as the
first stable version; from then on requests for it are routed by the controller's weights
(rollout/adapter.py), so a promote makes the candidate the name's only version and a
rollback or abort leaves the stable one.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import PurePath
from typing import Any

from serve_app.rollout.adapter import AdapterSplit, adapter_split, check_version_name, internal_name
from serve_app.rollout.controller import Deployer, RolloutController, StateStore
from serve_app.rollout.state import AnalysisConfig, RolloutError, Strategy, Version
from serve_app.rollout.window import Outcome


def default_version_name(path: str) -> str:
    """A directory's version label: its last path component (as a model version's default)."""
    return PurePath(path.rstrip("/")).name


class AdapterControllers:
    """public adapter name -> its RolloutController.

    stores(key) gives the StateStore of one key: "index" (the names with a controller) and
    "adapter:<name>"; deployer(name) the Deployer of one adapter's versions.
    """

    def __init__(
        self,
        stores: Callable[[str], StateStore],
        deployer: Callable[[str], Deployer],
        clock: Callable[[], float] = time.time,
    ):
        self.stores, self.deployer, self.clock = stores, deployer, clock
        self.served: dict[str, str] = {}  # public name -> directory, as the app's config has it
        self.controllers: dict[str, RolloutController] = {}
        self._ticked: dict[str, float] = {}  # name -> the clock at its last analysis
        self._index = stores("index")
        text = self._index.load()
        for name in json.loads(text) if text else []:
            self.controllers[name] = self._controller(name, None)  # restored from its store

    def register(self, adapters: dict[str, str]) -> None:
        """The adapters the app serves from its config (name -> directory): the stable
        version of a first rollout when the operator names none."""
        self.served.update(adapters)

    def start(
        self,
        public: str,
        version: str,
        config: dict[str, Any],
        strategy: Strategy,
        analysis: AnalysisConfig | None = None,
        stable_path: str | None = None,
    ) -> RolloutController:
        """Start rolling `public` out to the adapter directory config["model"] as `version`.
        stable_path: the directory served now (needed for a name without a controller that
        the config does not list, e.g. one loaded at run time)."""
        check_version_name(version)
        ctl = self.controllers.get(public)
        if ctl is None:
            path = stable_path or self.served.get(public)
            if not path:
                raise RolloutError(
                    f"adapter {public!r} has no rollout yet and is not in the app's config: "
                    "name the directory it is served from (--from)"
                )
            base = Version(default_version_name(path), path)
            if base.name == version:
                raise RolloutError(
                    f"{version!r} is the stable version's name (its directory's); pass --version"
                )
            ctl = self._controller(public, base)
        ctl.start(version, config, strategy, analysis)
        if public not in self.controllers:
            self.controllers[public] = ctl
            self._index.save(json.dumps(sorted(self.controllers)))
        return ctl

    def get(self, public: str) -> RolloutController:
        ctl = self.controllers.get(public)
        if ctl is None:
            names = sorted(self.controllers) or "none"
            raise RolloutError(f"no rollout of adapter {public!r}; adapters with one: {names}")
        return ctl

    def splits(self) -> dict[str, AdapterSplit]:
        return {
            name: adapter_split(name, ctl.state, ctl.configs, ctl.generation)
            for name, ctl in self.controllers.items()
        }

    def record(self, outcomes: list[Outcome]) -> None:
        for name, ctl in self.controllers.items():
            mine = [o for o in outcomes if o.target == name]
            if mine:
                ctl.record(mine)

    def tick(self) -> None:
        """One analysis of each adapter whose analysis.interval_s has passed since its last."""
        now = self.clock()
        for name, ctl in self.controllers.items():
            last = self._ticked.get(name)
            if last is None or now - last >= ctl.state.analysis.interval_s:
                self._ticked[name] = now
                ctl.tick()

    def min_interval(self) -> float:
        """The shortest analysis interval of the adapters' rollouts (inf: none)."""
        return min(
            (c.state.analysis.interval_s for c in self.controllers.values()), default=math.inf
        )

    def status(self, public: str) -> dict[str, Any]:
        """The controller's status, with each version's engine adapter name as its app."""
        status = self.get(public).status()
        status["apps"] = {v: internal_name(public, v) for v in status["apps"]}
        status["adapter"] = public
        return status

    def _controller(self, public: str, base: Version | None) -> RolloutController:
        store = self.stores(f"adapter:{public}")
        if base is None:  # restoring: the saved document holds the base
            base = Version("restored", "restored")
        return RolloutController(base, store, self.deployer(public), self.clock)
