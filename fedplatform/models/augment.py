"""Student view and local-training augmentation (spec §3.3), on whole batches on the device.

Every random draw comes from an explicit `torch.Generator`, never the global RNG, so a client's
local training is a pure function of its inputs and generator seed whichever process runs it.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from fedplatform.errors import UserError

PADDING = 4
"""RandomCrop padding of the reference (RandomCrop(32, padding=4)); used at every image size."""


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [N, H, W, C] -> float32 [N, C, H, W]: ToTensor (x / 255) then Normalize(mean, std).
    mean and std: sequences, or float32 tensors already on the images' device (no copy per call)."""
    if images.dim() != 4 or images.shape[-1] != len(mean) or len(mean) != len(std):
        raise ValueError(
            f"expected uint8 images [N, H, W, C] with C = len(mean) = len(std) = {len(mean)}, "
            f"got shape {tuple(images.shape)} and {len(std)} std values"
        )
    x = images.permute(0, 3, 1, 2).to(torch.float32).div(255)
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return x.sub(m).div(s).contiguous()


def crop_flip_shared(x: torch.Tensor, generator: torch.Generator, padding: int = PADDING) -> torch.Tensor:
    """Reference: RandomCrop(H x W, padding, zero fill) + RandomHorizontalFlip(0.5) applied to the
    batch tensor, so ONE offset and ONE flip decision are shared by all images. The zero fill is
    in normalised space. Draws in torchvision's order: row offset, column offset, flip."""
    h, w = x.shape[-2:]
    i = int(torch.randint(0, 2 * padding + 1, (1,), generator=generator, device=generator.device))
    j = int(torch.randint(0, 2 * padding + 1, (1,), generator=generator, device=generator.device))
    flip = bool(torch.rand(1, generator=generator, device=generator.device) < 0.5)
    out = F.pad(x, (padding, padding, padding, padding))[..., i : i + h, j : j + w]
    return out.flip(-1) if flip else out


def crop_flip_per_sample(x: torch.Tensor, generator: torch.Generator, padding: int = PADDING) -> torch.Tensor:
    """Same crop (zero fill in normalised space) and flip, drawn independently for every image."""
    b, _, h, w = x.shape
    g = generator
    i = torch.randint(0, 2 * padding + 1, (b,), generator=g, device=g.device).to(x.device)
    j = torch.randint(0, 2 * padding + 1, (b,), generator=g, device=g.device).to(x.device)
    flip = (torch.rand(b, generator=g, device=g.device) < 0.5).to(x.device)
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = i[:, None] + ar_h  # [B, H]
    # A flipped crop reads the window's columns right to left, so crop and flip are one gather.
    cols = j[:, None] + torch.where(flip[:, None], w - 1 - ar_w, ar_w)  # [B, W]
    padded = F.pad(x, (padding, padding, padding, padding))
    batch = torch.arange(b, device=x.device)[:, None, None]
    # Advanced indices on dims 0, 2, 3 around a slice put the indexed dims first: [B, H, W, C].
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def no_augmentation(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return x


AUGMENTATIONS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "reference": crop_flip_shared,
    "per_sample": crop_flip_per_sample,
    "none": no_augmentation,
}


def augment(x: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Apply augmentation `mode` (reference | per_sample | none) to a normalised batch [B, C, H, W]."""
    if mode not in AUGMENTATIONS:
        raise UserError(f"augmentation={mode!r} is not known; choose one of {', '.join(AUGMENTATIONS)}")
    return AUGMENTATIONS[mode](x, generator)
