"""FedAvg's settings (the `algorithm:` section of `fedavg.py`) and the reference local training
that FedProx, CReFF and CLIP2FL share. Pydantic only, no torch: validating a pipeline stays cheap."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from fedplatform.algorithms.server_opt_config import ServerOptimizerConfig
from fedplatform.config import Section


class LocalTraining(Section):
    """Reference local SGD: lr 0.1, batch 32, no momentum or weight decay."""

    local_epochs: int = Field(10, ge=1)
    lr: float = Field(0.1, gt=0.0)
    batch_size: int = Field(32, ge=1)
    augmentation: Literal["reference", "per_sample", "imagenet", "none"] = "reference"
    """Fixed-size images: reference (one random crop, pad 4, and flip per batch, as the CLIP2FL
    code), per_sample (an independent draw per image) or none. Encoded images (ImageNet-LT, PACS):
    imagenet (RandomResizedCrop + flip + ColorJitter(0.4, 0.4, 0.4, 0)) or none."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Local training arithmetic: fp32 (reference) or bf16 autocast of the forward pass (weights,
    gradients, optimizer and the loss stay fp32; no loss scaling needed). bf16 changes the numbers
    slightly; it is fast on GPUs and on CPUs with AMX/AVX512-BF16."""


class FedAvgConfig(LocalTraining):
    """FedAvg (McMahan et al. 2017): sample-weighted mean of every state entry."""

    name: Literal["fedavg"] = "fedavg"
    server_optimizer: ServerOptimizerConfig | None = None
    """null: the plain average becomes the new global model (McMahan et al.); fedavgm, fedadam or
    fedyogi: the server steps on the pseudo-gradient (average - global) instead (Reddi et al. 2021)."""

    @field_validator("server_optimizer", mode="before")
    @classmethod
    def _name_alone(cls, value):
        """`server_optimizer: fedadam` is short for `server_optimizer: {name: fedadam}`."""
        return {"name": value} if isinstance(value, str) else value
