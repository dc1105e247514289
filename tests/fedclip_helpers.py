"""Shared fixtures data for the CLIP / feature-cache / FedCLIP tests: tiny generated domain folders."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from fedplatform.config import ExperimentConfig

DOMAINS = ("art", "cartoon", "photo", "sketch")
CLASSES = ("dog", "guitar", "house_cat")


def make_domain_folders(root: Path, per_class: int = 6, size: int = 20) -> Path:
    """<root>/<domain>/<class>/<i>.png: small RGB PNGs whose colour depends on class and domain."""
    rng = np.random.default_rng(0)
    for d, domain in enumerate(DOMAINS):
        for c, cls in enumerate(CLASSES):
            folder = root / domain / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                base = np.array([80 * c, 60 * d, 255 - 80 * c], dtype=np.float64)
                img = np.clip(base + rng.normal(0, 25, (size + i % 3, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i:03d}.png")
    return root


def domain_config(root: Path, test_domain: str | list[str] | None = "art", **algorithm) -> ExperimentConfig:
    held = [] if test_domain is None else [test_domain] if isinstance(test_domain, str) else test_domain
    n = len(DOMAINS) - len(held)
    return ExperimentConfig.model_validate({
        "seed": 0,
        "data": {"dataset": "imagefolder_domains", "root": str(root), "test_domain": test_domain},
        "partition": {"scheme": "per_domain", "num_clients": n, "split_fractions": [0.6, 0.2, 0.2]},
        "clip": {"model": "fedplatform-tiny", "pretrained": None},
        "algorithm": {"name": "fedclip", "batch_size": 4, **algorithm},
        "clients_per_round": n,
    })
