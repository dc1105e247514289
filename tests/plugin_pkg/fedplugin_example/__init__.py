"""FedAvg with a server learning rate (one extra config key) and a one-hidden-layer student."""
from pydantic import Field
from torch import nn

from fedplatform import register_algorithm, register_model
from fedplatform.algorithms.fedavg import FedAvg
from fedplatform.algorithms.fedavg_config import FedAvgConfig


class FedAvgScaledConfig(FedAvgConfig):
    server_lr: float = Field(1.0, gt=0.0)
    """x_{t+1} = x_t + server_lr * (client average - x_t); 1 is FedAvg."""


@register_algorithm("fedavg_scaled", config=FedAvgScaledConfig)
class FedAvgScaled(FedAvg):
    def aggregate_finish(self, state, acc, round):
        average = super().aggregate_finish(state, acc, round)
        return {k: state[k] + self.cfg.server_lr * (v - state[k]) if v.is_floating_point() else v
                for k, v in average.items()}


class TinyMLP(nn.Module):
    """Flattened pixels -> 32 ReLU features -> logits (the student contract: features, classifier)."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int):
        super().__init__()
        self.feature_dim = 32
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, 32), nn.ReLU())
        self.classifier = nn.Linear(32, num_classes)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.classifier(self.features(x))


@register_model("tiny_mlp")
def tiny_mlp(num_classes: int, in_channels: int = 1, image_size: int = 8) -> nn.Module:
    return TinyMLP(num_classes, in_channels, image_size)
