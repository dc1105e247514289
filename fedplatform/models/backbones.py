"""Student networks, one registry, one entry point: `create_model(name, num_classes, ...)`.

Every model maps a normalised float batch [B, C, H, W] to logits, and exposes
`features(x)` (the penultimate feature z), `classifier` (the nn.Linear head, z -> logits) and
`feature_dim`, so that `model(x) == model.classifier(model.features(x))`. Algorithms that need
both z and the logits (KD, classifier re-training, gradient matching) call `features` once and
apply `classifier` themselves.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable

import torch
from torch import nn

from fedplatform.errors import UserError

ModelBuilder = Callable[..., nn.Module]
MODELS: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register a builder `fn(num_classes, in_channels, image_size) -> nn.Module` under `name`."""

    def decorator(builder: ModelBuilder) -> ModelBuilder:
        if name in MODELS and MODELS[name] is not builder:
            raise ValueError(f"model '{name}' is already registered")
        MODELS[name] = builder
        return builder

    return decorator


def check_model_name(name: str) -> None:
    """A registered model, or one an installed `fedplatform.models` entry point of that name provides
    (a module that registers it, or the builder itself)."""
    from fedplatform.plugins import MODEL_GROUP, entry_point_names, load_entry_point

    if name not in MODELS:
        try:
            builder = load_entry_point(MODEL_GROUP, name)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if name not in MODELS and callable(builder) and not inspect.ismodule(builder):
            register_model(name)(builder)
    if name not in MODELS:
        known = sorted(set(MODELS) | set(entry_point_names(MODEL_GROUP)))
        raise UserError(f"model.name={name!r} is not a known model; choose one of {', '.join(known)}")


def create_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """Build registered model `name` for `num_classes` classes and square `image_size` inputs."""
    check_model_name(name)
    return MODELS[name](num_classes=num_classes, in_channels=in_channels, image_size=image_size)


# ---------------------------------------------------------------------------- ResNet-8


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut, then ReLU; a stride-2 shortcut is conv1x1 + BN."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class ResNet8(nn.Module):
    """CLIP2FL student `ResNet_cifar(resnet_size=8, scaling=4)` (spec §2.1).

    Stem conv3x3 -> 64, BasicBlocks 64 (s1), 128 (s2), 256 (s2), global average pool (the
    reference's AvgPool2d(8) at 32x32), `add_mlp` Linear(256, 512) with no activation -> z,
    `classifier` Linear(512, C). 1,361,738 parameters for C=10, 1,407,908 for C=100.
    `add_mlp=False` is the original CReFF network (CReFF-FL, spec §1): z = the pooled 256-d
    feature, `classifier` Linear(256, C); 1,227,594 parameters for C=10.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 32, add_mlp: bool = True):
        super().__init__()
        self.feature_dim = 512 if add_mlp else 256
        self.conv1 = _conv3x3(in_channels, 64)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(64, 64, 1))
        self.layer2 = nn.Sequential(BasicBlock(64, 128, 2))
        self.layer3 = nn.Sequential(BasicBlock(128, 256, 2))
        # Each stride-2 stage maps H to ceil(H / 2); pooling with a kernel of the final map size
        # is the reference AvgPool2d(8) at 32x32 and a global average pool at any declared size.
        final = math.ceil(math.ceil(image_size / 2) / 2)
        self.avgpool = nn.AvgPool2d(kernel_size=final)
        self.add_mlp = nn.Linear(256, self.feature_dim) if add_mlp else nn.Identity()
        self.classifier = nn.Linear(self.feature_dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x)
        if x.shape[-2:] != (1, 1):
            raise ValueError(f"resnet8 was built for another image size; got input of size {tuple(x.shape)}")
        return self.add_mlp(torch.flatten(x, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("resnet8")
def resnet8(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    return ResNet8(num_classes, in_channels, image_size)


@register_model("resnet8_creff")
def resnet8_creff(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """The original CReFF student: ResNet-8 without add_mlp, 256-d features into Linear(256, C)."""
    return ResNet8(num_classes, in_channels, image_size, add_mlp=False)


# ---------------------------------------------------------------------------- ResNet-50


class ResNet50(nn.Module):
    """ImageNet-LT student (spec clip2fl §9.12, not in the reference run: unverified): torchvision's
    ResNet-50 (random init) up to its global average pool (2048-d), `add_mlp` Linear(2048, 512)
    with no activation -> z (CLIP's width, for the prototype loss), `classifier` Linear(512, C)."""

    feature_dim = 512

    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 224):
        super().__init__()
        from torchvision.models import resnet50

        if in_channels != 3:
            raise UserError(f"model.name=resnet50 takes RGB images (3 channels), the data have {in_channels}")
        self.body = resnet50(weights=None)
        self.body.fc = nn.Identity()
        self.add_mlp = nn.Linear(2048, self.feature_dim)
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_mlp(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("resnet50")
def resnet50(num_classes: int, in_channels: int = 3, image_size: int = 224) -> nn.Module:
    return ResNet50(num_classes, in_channels, image_size)


# ---------------------------------------------------------------------------- small CNN


class SmallCNN(nn.Module):
    """Fast CNN for tiny images (8x8 digits): two conv3x3-BN-ReLU (32, 64), 2x2 max-pool,
    average pool to 4x4, linear feature layer (128, no activation, like resnet8's add_mlp),
    classifier. `feature_dim` 128 (small_cnn) or 512 (small_cnn_512: CLIP-width features for CLIP2FL)."""

    def __init__(self, num_classes: int, in_channels: int = 1, image_size: int = 8, feature_dim: int = 128):
        super().__init__()
        self.feature_dim = feature_dim
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),  # identity at 8x8; keeps larger inputs at 64*4*4 features
        )
        self.project = nn.Linear(64 * 4 * 4, self.feature_dim)
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.flatten(self.body(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("small_cnn")
def small_cnn(num_classes: int, in_channels: int = 1, image_size: int = 8) -> nn.Module:
    return SmallCNN(num_classes, in_channels, image_size)


@register_model("small_cnn_512")
def small_cnn_512(num_classes: int, in_channels: int = 1, image_size: int = 8) -> nn.Module:
    return SmallCNN(num_classes, in_channels, image_size, feature_dim=512)


# ---------------------------------------------------------------------------- MLP


class MLP(nn.Module):
    """Flattened pixels -> Linear(in, hidden) -> ReLU (the feature z) -> classifier Linear(hidden, C).
    On 8x8 digits: 64 -> 64 -> 10, the MLP of the Flower digits benchmark (torch default init; built
    in the same order, so the same seed gives the same initial weights)."""

    def __init__(self, num_classes: int, in_channels: int = 1, image_size: int = 8, hidden: int = 64):
        super().__init__()
        self.feature_dim = hidden
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, hidden), nn.ReLU())
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("mlp")
def mlp(num_classes: int, in_channels: int = 1, image_size: int = 8) -> nn.Module:
    return MLP(num_classes, in_channels, image_size)
