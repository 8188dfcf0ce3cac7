"""Merge the Prometheus text pages of Ray's node metrics agents into the one `/metrics` page.

Pure text in, text out (no Ray here). Each node agent exports every metric of every process on
its node with a `ray_` prefix and Ray's bookkeeping labels. The merge keeps only moeserve's
families (renamed `ray_moeserve_*` -> `moeserve_*`) and Serve's replica-count families, drops the
bookkeeping labels, and keeps the process identity as `worker`, so that two processes that
record the same series (two ingress replicas, say) stay two series and never look like a counter
reset. Families seen on several nodes are written once, with all their samples.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

RAY_PREFIX = "ray_"
DROPPED_LABELS = frozenset(
    {
        "Component",
        "NodeAddress",
        "SessionName",
        "Version",  # Ray's version; would be confused with moeserve's `version` label
        "otel_scope_name",
        "otel_scope_schema_url",
        "otel_scope_version",
    }
)
RENAMED_LABELS = {"WorkerId": "worker"}
_SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(.*)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(slots=True)
class _Family:
    help: str = ""
    type: str = "untyped"
    samples: dict[str, str] = field(default_factory=dict)  # name{labels} -> value


def public_name(ray_name: str, passthrough: frozenset[str]) -> str | None:
    """The name `/metrics` shows for a family the agent calls `ray_name`, or None to drop it."""
    if ray_name.startswith(RAY_PREFIX + "moeserve_"):
        return ray_name[len(RAY_PREFIX) :]
    return ray_name if ray_name in passthrough else None


def merge_ray_expositions(texts: Iterable[str], passthrough: Iterable[str] = ()) -> str:
    keep = frozenset(passthrough)
    families: dict[str, _Family] = {}
    for text in texts:
        current: str | None = None  # the public name of the family being read, None: skip it
        ray_family = ""
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                parts = line.split(" ", 3)
                if len(parts) < 4:
                    continue
                ray_family = parts[2]
                current = public_name(ray_family, keep)
                if current is not None:
                    fam = families.setdefault(current, _Family())
                    if parts[1] == "HELP":
                        fam.help = parts[3]
                    else:
                        fam.type = parts[3]
                continue
            if not line or line.startswith("#") or current is None:
                continue
            m = _SAMPLE.match(line)
            if m is None or not _belongs(m.group(1), ray_family):
                continue
            name = current + m.group(1)[len(ray_family) :]
            key = name + _relabel(m.group(2) or "")
            families[current].samples.setdefault(key, m.group(3))
    out: list[str] = []
    for name, fam in families.items():
        if not fam.samples:
            continue
        if fam.help:
            out.append(f"# HELP {name} {fam.help}")
        out.append(f"# TYPE {name} {fam.type}")
        out.extend(f"{key} {value}" for key, value in fam.samples.items())
    return "\n".join(out) + "\n" if out else ""


def _belongs(sample: str, family: str) -> bool:
    return sample == family or (sample.startswith(family) and sample[len(family) :] in _SUFFIXES)


def _relabel(labels: str) -> str:
    pairs = [
        (RENAMED_LABELS.get(k, k), v) for k, v in _LABEL.findall(labels) if k not in DROPPED_LABELS
    ]
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "}"
