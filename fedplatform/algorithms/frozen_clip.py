"""What FedCLIP and CLIP2FL share: one frozen CLIP per actor and its image embeddings.

The image encoder is frozen, in eval mode, and sees only the deterministic CLIP view of each image,
so its embeddings come from the feature cache built once before the run (`use_feature_cache`,
default) and equal what re-running the encoder gives (the reference path, `use_feature_cache:
false`, which encodes the requested images every time).

open_clip takes seconds to import: `fedplatform.models.clip` / `feature_cache` are imported on first
use, so importing the algorithm registry stays cheap for the other algorithms.
"""
from __future__ import annotations

import numpy as np
import torch


class FrozenCLIP:
    """Mixin for an `Algorithm` whose config has `prompt_template`, `clean_class_names` and
    `use_feature_cache`. `load_clip()` sets `clip`, `preprocess` and `text` (the
    L2-normalised class-prompt prototypes [C, d] on the device)."""

    clip = None
    _cache: np.ndarray | None = None

    @classmethod
    def check(cls, cfg) -> None:
        """This machine can load the CLIP: one clear line now rather than an actor's death."""
        super().check(cfg)
        if cfg.clip.model:
            from fedplatform.models.clip import require_weights

            require_weights(cfg.clip.model, cfg.clip.pretrained)

    @staticmethod
    def build_cache(cfg, dataset) -> list:
        """Driver side: build (or verify) the feature cache once for all actors; [its directory]."""
        if not cfg.algorithm.use_feature_cache:
            return []
        from fedplatform.models.feature_cache import build_feature_cache

        return [build_feature_cache(cfg, dataset)]

    def load_clip(self):
        if self.clip is None:
            from fedplatform.models.clip import clip_with_prototypes

            clip = self.ctx.cfg.clip
            self.clip, self.preprocess, _, self.text = clip_with_prototypes(
                clip.model, clip.pretrained, self.ctx.class_names, self.cfg.prompt_template,
                self.cfg.clean_class_names, self.ctx.device)
        return self.clip

    def cached_embeddings(self) -> np.ndarray:
        """The memory-mapped feature cache [N, d] of the whole store."""
        if self._cache is None:
            from fedplatform.models.feature_cache import load_feature_cache

            self._cache = load_feature_cache(self.ctx.cfg, self.ctx.dataset)
        return self._cache

    def image_embeddings(self, ids: np.ndarray) -> torch.Tensor:
        """float(encode_image(CLIP view)) of samples [n, d] float32 on the device: cached rows, or
        the encoder run on them now, at the cache's precision whatever the caller's autocast (the
        same numbers as the cache; a frozen model under autocast also re-casts its weights every call)."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.cfg.use_feature_cache:
            return torch.from_numpy(np.array(self.cached_embeddings()[ids])).to(self.ctx.device)
        from fedplatform.models.feature_cache import encode_samples

        # One batch per step, in this thread: a pool for 32 images per step measured 25 % slower on
        # an H200 (16 threads) than one thread.
        with torch.no_grad(), torch.autocast(self.ctx.device.type, enabled=False):
            e = encode_samples(self.load_clip(), self.preprocess, self.ctx.dataset, ids, threads=1)
        return torch.from_numpy(e).to(self.ctx.device)
