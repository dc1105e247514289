"""CLIP2FL's settings (the `algorithm:` section of `clip2fl.py`); no torch, so validating a
pipeline stays cheap."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedplatform.algorithms.creff_config import CReFFConfig
from fedplatform.config import PromptTemplate


class CLIP2FLConfig(CReFFConfig):
    """CLIP2FL (Shi et al., AAAI 2024; spec clip2fl): CReFF plus client KD from a frozen CLIP teacher
    (CE + kd_weight * T^2 * KL(teacher || student)) and the prototype contrastive loss on the
    federated features. Defaults = reference commit 565e858."""

    name: Literal["clip2fl"] = "clip2fl"
    kd_weight: float = Field(1.0, ge=0.0)
    """alpha (the paper's beta); 2 before 2024-05-02."""
    kd_temperature: float = Field(3.0, gt=0.0)
    contrast_weight: float = Field(0.001, ge=0.0)
    """eta (`contrast_alpha`); 0.5 before 2024-04-26."""
    ins_temp: float = Field(0.1, gt=0.0)
    """tau of the prototype contrastive loss."""
    pcl_form: Literal["reference", "paper"] = "reference"
    """reference: contrast against the repeated text prototypes (closed form, N x C); paper: against
    the other federated features (N x N, unconfirmed transcription, spec §8)."""
    use_feature_cache: bool = True
    """Teacher image embeddings from the feature cache; false runs CLIP every step (reference)."""
    prompt_template: PromptTemplate = "a photo of a {}"
    clean_class_names: bool = False
    """Underscores in class names to spaces (the reference keeps them)."""
