"""CReFF's settings (the `algorithm:` section of `creff.py`); no torch, so validating a pipeline
stays cheap."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fedplatform.algorithms.fedavg_config import LocalTraining


class CReFFConfig(LocalTraining):
    """CReFF (Shang et al., IJCAI 2022) as run inside the CLIP2FL reference (spec clip2fl §4, §6):
    FedAvg local training; per-class classifier gradients uploaded; the server learns federated
    features by gradient matching and re-trains a classifier on them. Defaults = reference."""

    name: Literal["creff"] = "creff"
    num_features_per_class: int = Field(100, ge=1)
    """m: federated features per class (`num_of_feature`; the reference only runs with 100)."""
    match_epoch: int = Field(100, ge=0)
    """Full-batch SGD steps on the federated features per round."""
    lr_feature: float = Field(0.1, gt=0.0)
    crt_epoch: int = Field(300, ge=0)
    """Epochs of classifier re-training on the features per round (batch `batch_size`)."""
    lr_net: float = Field(0.01, gt=0.0)
    batch_real: int = Field(32, ge=1)
    """Real images per class per gradient draw (10 draws, one DSA augmentation each)."""
    dis_metric: Literal["ours", "mse", "cos"] = "ours"
    """Gradient-matching distance: ours (per-row cosine + bias row), mse, cos (spec §5.2)."""
    gml_form: Literal["reference", "paper"] = "reference"
    """reference: sum over the C weight rows + the bias row; paper: mean over weight rows only (§8)."""
    real_gradient: Literal["reference", "paper"] = "reference"
    """reference: mean of 10 DSA mini-batches of <= batch_real; paper: mean over all local class samples (§8)."""
    gradient_weighting: Literal["unweighted", "by_count"] = "unweighted"
    """Server mean of the clients' class gradients: unweighted (reference) or weighted by n_c^k (§9.7)."""

    @model_validator(mode="after")
    def _gml(self):
        if self.gml_form == "paper" and self.dis_metric != "ours":
            raise ValueError(f"algorithm.gml_form=paper is the paper's per-row cosine; it needs dis_metric=ours, "
                             f"got {self.dis_metric!r}")
        return self
