"""FedProx's settings (the `algorithm:` section of `fedprox.py`); no torch, as `fedavg_config`."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedplatform.algorithms.fedavg_config import FedAvgConfig


class FedProxConfig(FedAvgConfig):
    """FedProx (Li et al. 2020): local loss + mu/2 * ||w - w_global||^2."""

    name: Literal["fedprox"] = "fedprox"
    mu: float = Field(0.01, ge=0.0)
