"""A split's images as the student sees them: normalised float batches [B, C, H, W] on the device.

Fixed-size stores (digits, CIFAR) keep uint8 pixels; a batch is normalised when it is taken and
augmented on the device (`models.augment`). Encoded stores (ImageNet-LT, PACS) keep file bytes; a
batch is decoded and transformed with torchvision as the standard ImageNet recipe (train:
RandomResizedCrop + flip + ColorJitter(0.4, 0.4, 0.4, 0); plain: Resize(S·256/224) + CenterCrop(S)),
S = `model.input_size`. Both index by position in the split: `images[index]` (= `plain(index)`)
is the un-augmented view, `train(index, mode, generator)` the augmented one.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from fedplatform.algorithms.base import ClientData, Context, draw_seed, seeded_global_rng
from fedplatform.config import ExperimentConfig
from fedplatform.errors import UserError
from fedplatform.models.augment import AUGMENTATIONS, augment, normalize

ENCODED_AUGMENTATIONS = ("imagenet", "none")
PIXEL_AUGMENTATIONS = tuple(AUGMENTATIONS)


def input_shape(cfg: ExperimentConfig, image_shape: tuple[int, int, int] | None) -> tuple[int, int, int]:
    """(H, W, C) the student network is built for: the store's pixel shape, or S x S x 3 for encoded images."""
    if image_shape is not None:
        return tuple(image_shape)
    return cfg.model.input_size, cfg.model.input_size, 3


def check_augmentation(mode: str, encoded: bool, dataset: str) -> None:
    """A student augmentation must suit how the store keeps images (one clear error before the run)."""
    valid = ENCODED_AUGMENTATIONS if encoded else PIXEL_AUGMENTATIONS
    if mode not in valid:
        kind = "encoded images of varying size" if encoded else "fixed-size pixels"
        raise UserError(f"algorithm.augmentation={mode!r} does not apply to {dataset!r}, whose store keeps {kind}; "
                        f"choose one of {', '.join(valid)}")


class PixelImages:
    def __init__(self, pixels: torch.Tensor, ctx: Context):
        self.pixels = pixels.to(ctx.device)
        # On the device once: a tensor made from a list per batch is a blocking host-to-device copy,
        # which would make every step of local training wait for the GPU.
        self.mean, self.std = (torch.tensor(v, dtype=torch.float32, device=ctx.device)
                               for v in (ctx.norm_mean, ctx.norm_std))

    def plain(self, index: torch.Tensor | slice) -> torch.Tensor:
        return normalize(self.pixels[index], self.mean, self.std)

    def train(self, index: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
        return augment(self.plain(index), mode, generator)

    __getitem__ = plain


class EncodedImages:
    def __init__(self, sample_ids: np.ndarray, ctx: Context):
        from torchvision.transforms import v2  # ~1 s of import (torch._dynamo): only for encoded stores

        self.ids = np.asarray(sample_ids, dtype=np.int64)
        self.dataset, self.device = ctx.dataset, ctx.device
        size = ctx.cfg.model.input_size
        tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(ctx.norm_mean, ctx.norm_std)]
        self.eval_transform = v2.Compose([v2.Resize(size * 256 // 224), v2.CenterCrop(size), *tail])
        self.train_transform = v2.Compose([v2.RandomResizedCrop(size), v2.RandomHorizontalFlip(),
                                           v2.ColorJitter(0.4, 0.4, 0.4, 0.0), *tail])

    def _batch(self, index: torch.Tensor | slice, transform) -> torch.Tensor:
        ids = self.ids[index.cpu().numpy() if isinstance(index, torch.Tensor) else index]
        images = [Image.open(io.BytesIO(b)).convert("RGB") for b in self.dataset.encoded(ids)]
        return torch.stack([transform(im) for im in images]).to(self.device)

    def plain(self, index: torch.Tensor | slice) -> torch.Tensor:
        return self._batch(index, self.eval_transform)

    def train(self, index: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
        if mode == "none":
            return self.plain(index)
        # torchvision draws from the global RNG: seed it from the client's generator.
        with seeded_global_rng(draw_seed(generator)):
            return self._batch(index, self.train_transform)

    __getitem__ = plain


StudentImages = PixelImages | EncodedImages


def student_images(data: ClientData, ctx: Context) -> StudentImages:
    """The student's view of `data`: its pixels, or its encoded images looked up by sample id."""
    if data.images is not None:
        return PixelImages(data.images, ctx)
    if data.sample_ids is None or ctx.dataset is None:
        raise ValueError(f"client {data.client_id}: encoded images need sample ids and the dataset to decode them")
    return EncodedImages(data.sample_ids, ctx)
