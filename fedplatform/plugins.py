"""Plug-ins: algorithms and models defined in the user's own package, found by name.

Two ways in, and both reach every Ray actor, because every process that validates a config
(the driver, each client and server actor, each sweep trial) resolves them the same way:
- entry points: a package declares `[project.entry-points."fedplatform.algorithms"] NAME = "pkg.module"`
  (or `"fedplatform.models"`); the entry point named like the requested algorithm or model is
  loaded the first time that name is asked for (its import registers it);
- `plugins: [pkg.module, ...]` in the pipeline: modules imported before the algorithm section is
  validated (each module must be importable on every node, e.g. on PYTHONPATH or installed).
A plug-in module registers with `@register_algorithm(NAME, config=ItsConfig)` and `@register_model(NAME)`.
Only importlib here: `import fedplatform.config` stays cheap.
"""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any, Iterable

ALGORITHM_GROUP = "fedplatform.algorithms"
MODEL_GROUP = "fedplatform.models"


def import_plugins(modules: Iterable[str]) -> None:
    """Import each `plugins:` module; ValueError (a config error) naming one that cannot be imported."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ValueError(f"plugins: cannot import {module!r} ({exc}); install its package or put it on "
                             "PYTHONPATH (on every node of the cluster)") from None


def entry_point_names(group: str) -> list[str]:
    return sorted({ep.name for ep in entry_points(group=group)})


def load_entry_point(group: str, name: str) -> Any:
    """Load (import) the entry point `name` of `group`; None when no installed package declares one."""
    for ep in entry_points(group=group, name=name):
        try:
            return ep.load()
        except ImportError as exc:
            raise ValueError(f"entry point {name!r} of {group} ({ep.value}) cannot be imported ({exc})") from None
    return None
