"""Federated algorithms; importing this package registers every built-in one."""
from fedplatform.algorithms import clip2fl, creff, fedavg, fedclip, fedprox, synthetic  # noqa: F401  (registration)
from fedplatform.algorithms.base import (
    ALGORITHMS,
    Algorithm,
    ClientData,
    ClientUpdate,
    Context,
    get_algorithm,
    register_algorithm,
)

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "ClientData",
    "ClientUpdate",
    "Context",
    "get_algorithm",
    "register_algorithm",
]
