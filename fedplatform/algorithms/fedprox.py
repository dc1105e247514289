"""FedProx (Li et al., MLSys 2020): FedAvg with a proximal term in the local objective."""
from __future__ import annotations

import torch
from torch import nn

from fedplatform.algorithms.base import ClientData, State, register_algorithm
from fedplatform.algorithms.fedavg import FedAvg, LocalLoss
from fedplatform.algorithms.fedprox_config import FedProxConfig


@register_algorithm("fedprox", config=FedProxConfig)
class FedProx(FedAvg):
    """Local loss = FedAvg's loss + mu/2 * ||w - w_global||^2 over the trainable parameters
    (`algorithm.mu`, default 0.01; mu = 0 is FedAvg). Aggregation and evaluation are FedAvg's."""

    def local_loss(self, payload: State, data: ClientData) -> LocalLoss:
        base = super().local_loss(payload, data)
        half_mu = self.cfg.mu / 2
        # The global weights, moved to the device once per update rather than once per step.
        anchors = {k: v.to(self.ctx.device) for k, v in payload.items() if v.is_floating_point()}

        def proximal(model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            distance = sum(
                (p - anchors[name]).pow(2).sum() for name, p in model.named_parameters() if p.requires_grad
            )
            return base(model, x, y, index) + half_mu * distance

        return proximal
