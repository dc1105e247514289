"""Federated algorithms. Built-in ones are found by name, as plug-ins' entry points are: algorithm
NAME lives in `fedplatform.algorithms.NAME`, imported the first time `get_algorithm(NAME)` asks for
it, and its config model in a light module beside it (pydantic only), so validating a pipeline
never imports torch. The contract (`base`, which does) loads on first use of its names here."""
from __future__ import annotations

BUILTIN_ALGORITHMS: dict[str, str] = {
    "fedavg": "fedplatform.algorithms.fedavg_config:FedAvgConfig",
    "fedprox": "fedplatform.algorithms.fedprox_config:FedProxConfig",
    "synthetic": "fedplatform.algorithms.synthetic_config:SyntheticConfig",
    "fedclip": "fedplatform.algorithms.fedclip_config:FedCLIPConfig",
    "creff": "fedplatform.algorithms.creff_config:CReFFConfig",
    "clip2fl": "fedplatform.algorithms.clip2fl_config:CLIP2FLConfig",
}
"""Built-in algorithm name -> its config model, as an entry point value (`module:Class`)."""

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "BUILTIN_ALGORITHMS",
    "ClientData",
    "ClientUpdate",
    "Context",
    "get_algorithm",
    "register_algorithm",
]


def __getattr__(name: str):
    if name in __all__:
        from fedplatform.algorithms import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
