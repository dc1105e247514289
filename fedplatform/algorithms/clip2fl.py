"""CLIP2FL (Shi et al., AAAI 2024, "CLIP-guided Federated Learning on Heterogeneous and Long-Tailed
Data"; reference shijiangming1/CLIP2FL @ 565e858, spec clip2fl).

CReFF plus two CLIP terms:
- client: loss = CE(s, y) + kd_weight · T² · KL(softmax(q/T) ‖ softmax(s/T)) (batchmean), teacher
  logits q = 100 · normalize(CLIP image embedding of the un-augmented view) · Tᵀ, T the normalised
  text prototypes of "a photo of a {class}" (spec §5.1; α = 1, T = 3);
- server: + contrast_weight · PCL(V, y_V, T) in the feature update (spec §5.3; η = 0.001, τ = 0.1),
  in the closed N x C form.
The teacher sees only un-augmented images through a frozen encoder, so its embeddings come from the
feature cache (`use_feature_cache`, default): identical to re-running CLIP every step as the
reference does (`use_feature_cache: false`), at a small matrix product per batch.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedplatform.algorithms.base import ClientData, State, register_algorithm, seeded_global_rng
from fedplatform.algorithms.clip2fl_config import CLIP2FLConfig
from fedplatform.algorithms.creff import CReFF
from fedplatform.algorithms.fedavg import LocalLoss
from fedplatform.algorithms.frozen_clip import FrozenCLIP
from fedplatform.algorithms.images import input_shape
from fedplatform.algorithms.federated_features import (
    feature_labels,
    prototype_contrastive_loss,
    prototype_contrastive_loss_paper,
)
from fedplatform.errors import UserError

TEACHER_LOGIT_SCALE = 100.0
"""Constant scale of the teacher's cosine logits in the reference (`100. * image @ text.T`)."""


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Reference `KDLoss`: T² · (1/B) Σ_i KL(softmax(teacher_i/T) ‖ softmax(student_i/T)); the
    gradient flows only into the student. Taken in fp32 (also under bf16 autocast)."""
    log_r = F.log_softmax(student.float() / temperature, dim=1)
    p = F.softmax(teacher.detach() / temperature, dim=1)
    return F.kl_div(log_r, p, reduction="batchmean") * temperature**2


def teacher_logits(image_embeddings: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """q = 100 · normalize(e) · Tᵀ (T already L2-normalised), [n, C] float32, also under autocast
    (the cached and the per-step teacher give the same logits at any student precision)."""
    with torch.autocast(image_embeddings.device.type, enabled=False):
        return TEACHER_LOGIT_SCALE * F.normalize(image_embeddings.float(), dim=-1) @ text.float().t()


def check_clip2fl(cfg, class_names: list[str], num_classes: int, student_dim: int) -> None:
    """Fail fast on a config CLIP2FL cannot run: no CLIP, CLIP width != student feature width,
    classes without names for the prompts."""
    if not cfg.clip.model:
        raise UserError("algorithm.name=clip2fl needs a CLIP teacher: set clip.model (e.g. ViT-B-32 with "
                        "clip.pretrained=openai)")
    from fedplatform.models.clip import embed_dim

    width = embed_dim(cfg.clip.model)
    if width != student_dim:
        raise UserError(
            f"clip.model={cfg.clip.model} has {width}-d embeddings but the student model.name={cfg.model.name} has "
            f"{student_dim}-d features (its projection); CLIP2FL compares the federated features with CLIP text "
            f"prototypes, so the widths must match (use a student with a {width}-d projection or another CLIP)")
    names = list(class_names or [])
    if len(names) != num_classes or any(not str(n).strip() for n in names):
        raise UserError(
            f"algorithm.name=clip2fl builds text prompts ({cfg.algorithm.prompt_template!r}) from class names, but the "
            f"dataset {cfg.data.dataset!r} has {len(names)} named classes for {num_classes} classes "
            f"(names: {names[:5]}{'...' if len(names) > 5 else ''}); use a source with class names")


@register_algorithm("clip2fl", config=CLIP2FLConfig)
class CLIP2FL(FrozenCLIP, CReFF):
    """CReFF + CLIP KD on clients + PCL on the server. One frozen CLIP per actor, loaded on first use
    (clients need its text prototypes even with cached image embeddings; the server needs them for PCL)."""

    def __init__(self, ctx):
        super().__init__(ctx)
        check_clip2fl(ctx.cfg, ctx.class_names, ctx.num_classes, self.feature_dim)

    @classmethod
    def prepare(cls, cfg, dataset) -> list:
        """Driver side: check the setting and build (or verify) the frozen-CLIP feature cache."""
        from fedplatform.models.backbones import create_model

        super().prepare(cfg, dataset)
        shape = input_shape(cfg, dataset.image_shape)
        with seeded_global_rng(0):
            dim = int(create_model(cfg.model.name, dataset.num_classes, shape[2], shape[0]).feature_dim)
        check_clip2fl(cfg, dataset.class_names, dataset.num_classes, dim)
        return cls.build_cache(cfg, dataset)

    # ------------------------------------------------------------------ client

    def local_loss(self, payload: State, data: ClientData) -> LocalLoss:
        """CE + kd_weight · KD(student, teacher). Cached: teacher logits of all the client's samples
        are one [n, C] product computed here; uncached: CLIP runs on each batch's CLIP views."""
        self.load_clip()
        if data.sample_ids is None:
            raise ValueError(f"client {data.client_id}: CLIP2FL needs sample ids to find the teacher's inputs")
        ids = np.asarray(data.sample_ids, dtype=np.int64)
        alpha, temp = self.cfg.kd_weight, self.cfg.kd_temperature
        cached = teacher_logits(self.image_embeddings(ids), self.text) if self.cfg.use_feature_cache else None

        def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            s = model(x)
            if cached is not None:
                q = cached[index]
            else:
                q = teacher_logits(self.image_embeddings(ids[index.cpu().numpy()]), self.text)
            return F.cross_entropy(s, y) + alpha * kd_loss(s, q, temp)

        return loss

    # ------------------------------------------------------------------ server

    def contrast(self):
        if self.cfg.contrast_weight == 0:
            return None, 0.0
        self.load_clip()
        c, m, tau = self.ctx.num_classes, self.cfg.num_features_per_class, self.cfg.ins_temp
        labels = feature_labels(c, m, self.ctx.device)
        text = self.text
        if self.cfg.pcl_form == "paper":
            return (lambda v: prototype_contrastive_loss_paper(v, labels, text, tau)), self.cfg.contrast_weight
        return (lambda v: prototype_contrastive_loss(v, labels, text, tau, m)), self.cfg.contrast_weight
