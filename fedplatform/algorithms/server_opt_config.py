"""Settings of the server optimizers (`algorithm.server_optimizer`, run by `server_opt.py`).

Pydantic only, no torch: validating a pipeline stays cheap (`fedplatform.config`)."""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field

from fedplatform.config import Section


class FedAvgMConfig(Section):
    """FedAvgM (Hsu et al. 2019) as in Reddi et al. 2021: v_t = momentum * v_{t-1} + delta_t,
    x_{t+1} = x_t + lr * v_t (delta_t = client average - x_t)."""

    name: Literal["fedavgm"] = "fedavgm"
    lr: float = Field(1.0, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)


class FedAdamConfig(Section):
    """FedAdam (Reddi et al. 2021, Algorithm 2; no bias correction): m_t = beta1 * m + (1 - beta1) * delta_t,
    v_t = beta2 * v + (1 - beta2) * delta_t^2, x_{t+1} = x_t + lr * m_t / (sqrt(v_t) + tau)."""

    name: Literal["fedadam"] = "fedadam"
    lr: float = Field(0.1, gt=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.99, ge=0.0, lt=1.0)
    tau: float = Field(1e-3, gt=0.0)
    """Adaptivity: the larger, the closer to server SGD with momentum."""


class FedYogiConfig(FedAdamConfig):
    """FedYogi (Reddi et al. 2021): FedAdam with v_t = v - (1 - beta2) * delta_t^2 * sign(v - delta_t^2)."""

    name: Literal["fedyogi"] = "fedyogi"
    lr: float = Field(0.01, gt=0.0)


ServerOptimizerConfig = Annotated[Union[FedAvgMConfig, FedAdamConfig, FedYogiConfig], Field(discriminator="name")]
"""One of them, chosen by its `name`."""
