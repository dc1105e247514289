"""FedCLIP's settings (the `algorithm:` section of `fedclip.py`); no torch, so validating a
pipeline stays cheap."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedplatform.config import PromptTemplate, Section


class FedCLIPConfig(Section):
    """FedCLIP (Lu et al. 2023; spec fedclip): frozen CLIP, an image-side attention adapter trained
    with the symmetric in-batch contrastive loss and averaged by the server. Defaults = reference."""

    name: Literal["fedclip"] = "fedclip"
    lr: float = Field(5e-5, gt=0.0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0.0)
    weight_decay: float = Field(0.2, ge=0.0)
    optimizer: Literal["adam", "adamw"] = "adam"
    """adam: coupled L2 decay as the reference (gradient += wd * w); adamw: decoupled (spec §8.4 option)."""
    local_epochs: int = Field(1, ge=1)
    """wk_iters: passes over the local train split per round, one optimizer for all of them."""
    batch_size: int = Field(32, ge=2)
    aggregation: Literal["uniform", "sample_weighted"] = "uniform"
    """uniform: mean over participating clients (reference); sample_weighted: FedAvg weights (§8.2 option)."""
    loss: Literal["in_batch", "all_classes"] = "in_batch"
    """in_batch: symmetric image-text CE over the batch (reference); all_classes: K-way CE against
    every class prompt (§8.11 option, documented deviation)."""
    use_feature_cache: bool = True
    """Train on cached frozen-CLIP image embeddings; false runs the image encoder every step (reference)."""
    prompt_template: PromptTemplate = "a picture of a {}"
    clean_class_names: bool = False
    """Underscores in class folder names to spaces (the reference keeps them)."""
