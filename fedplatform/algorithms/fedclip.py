"""FedCLIP (Lu et al. 2023, "FedCLIP: Fast Generalization and Personalization for CLIP in Federated
Learning"; reference microsoft/PersonalizedFL fedclip/, spec fedclip).

Frozen CLIP; each client trains only an image-side attention adapter f = normalize(A(v) ⊙ v) with
the symmetric in-batch image-text contrastive loss at CLIP's logit scale (100 for OpenAI weights),
a fresh Adam (lr 5e-5, betas (0.9, 0.98), eps 1e-6, coupled weight decay 0.2) every round, one
epoch at batch 32; the server takes the uniform mean of the adapters. Prediction: argmax of the
cosine between f and every class prompt "a picture of a {class}". Only the adapter (2·(d²+d)
parameters) is in the state, the payload and the updates.

Deviations (documented, spec §8): CLIP stays in eval mode (1); clients = domains, class names from
the folders, no held-out domain allowed (5, 6); the adapter init is seeded from the run seed (10).
With `use_feature_cache` (default) the frozen image embeddings come from the feature cache, which
equals re-running the encoder each step as the reference does (`use_feature_cache: false`).
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from fedplatform.algorithms.base import (
    Algorithm,
    ClientData,
    ClientUpdate,
    State,
    classification_metrics,
    register_algorithm,
    seeded_global_rng,
)
from fedplatform.algorithms.fedavg import WeightedSum
from fedplatform.algorithms.fedclip_config import FedCLIPConfig
from fedplatform.algorithms.frozen_clip import FrozenCLIP
from fedplatform.errors import UserError
from fedplatform.models.adapters import AttentionAdapter, gate_entropy

MAX_LOGIT_SCALE = 100.0
"""CLIP clamps exp(logit_scale) at 100; OpenAI's ViT-B/32 sits exactly there."""
EVAL_BATCH = 4096


def logit_scale(clip) -> float:
    """CLIP's own logit scale exp(t), capped at 100 (untrained CLIPs sit at 1/0.07)."""
    return min(float(clip.logit_scale.exp()), MAX_LOGIT_SCALE)


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, scale: float) -> torch.Tensor:
    """Reference loss: S = scale · F · Tᵀ (B×B, row i = image i, column j = text of sample j's class);
    ½ [CE(S, 0..B-1) + CE(Sᵀ, 0..B-1)], each CE a mean over rows. Same-class columns are not
    merged (spec §4: reproduce, do not fix)."""
    logits = scale * image_features @ text_features.t()
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def all_classes_loss(image_features: torch.Tensor, class_text: torch.Tensor, labels: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Option `loss: all_classes` (spec §8.11): K-way CE of scale · cos(f, t_k) over every class prompt."""
    return F.cross_entropy(scale * image_features @ class_text.t(), labels)


def _check_clip(cfg) -> None:
    if not cfg.clip.model:
        raise UserError("algorithm.name=fedclip needs clip.model (e.g. ViT-B-32 with clip.pretrained=openai)")


@register_algorithm("fedclip", config=FedCLIPConfig)
class FedCLIP(FrozenCLIP, Algorithm):
    """State / payload / update: the adapter's state dict (`attention.0.*` = W1, b1; `attention.2.*`
    = W2, b2). One frozen CLIP per actor (never per client), loaded on first use."""

    client_eval_splits = ("train", "val", "test")
    predict_head = "clip_adapter"

    def __init__(self, ctx):
        super().__init__(ctx)
        _check_clip(ctx.cfg)
        from fedplatform.models.clip import embed_dim

        self.dim = embed_dim(ctx.cfg.clip.model)
        self._adapter: AttentionAdapter | None = None

    @classmethod
    def prepare(cls, cfg, dataset) -> list:
        _check_clip(cfg)
        return cls.build_cache(cfg, dataset)

    @classmethod
    def predict_spec(cls, cfg, dataset) -> dict:
        """The logged model is the adapter alone; it names the frozen CLIP, loaded again through
        `models.clip.create_clip` (its weights are not copied into the run), and the CLIP's eval
        preprocessing: input = the store's pixels, or for encoded stores the CLIP's own view."""
        from fedplatform.models.clip import UNTRAINED_SEED, is_checkpoint_path, preprocess_config, weights_identity

        clip = cfg.clip
        pre = preprocess_config(clip.model, clip.pretrained)
        pretrained = clip.pretrained
        if pretrained is not None and is_checkpoint_path(pretrained):
            pretrained = os.path.abspath(pretrained)  # loadable from any working directory
        spec = {
            "model": clip.model,
            "norm_mean": list(pre["mean"]),
            "norm_std": list(pre["std"]),
            "clip": {"model": clip.model, "pretrained": pretrained, "weights": weights_identity(clip.model, pretrained),
                     "untrained_seed": UNTRAINED_SEED if pretrained is None else None,
                     "prompt_template": cfg.algorithm.prompt_template,
                     "clean_class_names": cfg.algorithm.clean_class_names, "preprocess": pre},
        }
        if dataset.image_shape is None:
            spec["input_shape"] = [*pre["size"], 3]
            spec["input_view"] = (f"RGB, {pre['size'][0]}x{pre['size'][1]} as the CLIP's eval preprocessing sizes it "
                                  f"({pre['interpolation']} resize, open_clip resize_mode {pre['resize_mode']})")
        return spec

    @property
    def scale(self) -> float:
        return logit_scale(self.load_clip())

    def working_adapter(self, state: State) -> AttentionAdapter:
        if self._adapter is None:
            with seeded_global_rng(0):  # overwritten by `state`; keep the global RNG as it was
                self._adapter = AttentionAdapter(self.dim).to(self.ctx.device)
        self._adapter.load_state_dict(state)
        return self._adapter

    # ------------------------------------------------------------------ contract

    def init_server_state(self, seed: int) -> State:
        """One adapter, PyTorch default init drawn from `seed` (the reference draws it from the global
        RNG after building CLIP, which cannot be matched bit-exactly - spec §8.10)."""
        with seeded_global_rng(seed):
            adapter = AttentionAdapter(self.dim)
        return {k: v.detach().clone() for k, v in adapter.state_dict().items()}

    def broadcast(self, state: State) -> State:
        return state

    def client_update(self, payload: State, data: ClientData, generator: torch.Generator) -> ClientUpdate:
        ids = np.asarray(data.sample_ids, dtype=np.int64)
        n = len(ids)
        if n == 0:
            raise ValueError(f"client {data.client_id} has no training samples")
        self.load_clip()
        scale, device = self.scale, self.ctx.device
        adapter = self.working_adapter(payload)
        adapter.train()
        params = list(adapter.parameters())
        opt_cls = torch.optim.Adam if self.cfg.optimizer == "adam" else torch.optim.AdamW
        optimizer = opt_cls(params, lr=self.cfg.lr, betas=tuple(self.cfg.betas), eps=self.cfg.eps,
                            weight_decay=self.cfg.weight_decay)
        labels = data.labels.to(device=device, dtype=torch.long)
        # Cached: every embedding of the client at once; otherwise the encoder runs on each batch.
        feats = self.image_embeddings(ids) if self.cfg.use_feature_cache else None
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        steps = 0
        for _ in range(self.cfg.local_epochs):
            order = torch.randperm(n, generator=generator, device=generator.device)
            for start in range(0, n, self.cfg.batch_size):
                index = order[start : start + self.cfg.batch_size]
                if len(index) < 2:
                    continue  # reference: size-1 batches are skipped
                v = feats[index.to(device)] if feats is not None else self.image_embeddings(ids[index.numpy()])
                y = labels[index.to(device)]
                f = adapter(v)
                if self.cfg.loss == "in_batch":
                    loss = contrastive_loss(f, self.text[y], scale)
                else:
                    loss = all_classes_loss(f, self.text, y, scale)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach()
                steps += 1
        train_loss = (loss_sum / steps).item() if steps else float("nan")
        tensors = {k: v.detach().to("cpu", copy=True) for k, v in adapter.state_dict().items()}
        return ClientUpdate(data.client_id, n, tensors, {"train_loss": train_loss, "local_steps": float(steps)})

    def aggregate_start(self, state: State, round: int) -> WeightedSum:
        """uniform (reference): Σ_i 1/n · adapter_i; sample_weighted: FedAvg weights."""
        return WeightedSum()

    def aggregate_add(self, acc: WeightedSum, update: ClientUpdate) -> None:
        acc.add(update.tensors, 1 if self.cfg.aggregation == "uniform" else update.num_samples)

    def aggregate_finish(self, state: State, acc: WeightedSum, round: int) -> State:
        return acc.result()

    @torch.no_grad()
    def _predict(self, state: State, ids: np.ndarray) -> tuple[torch.Tensor, float]:
        """(argmax_k cos(f, t_k) per sample, mean gate entropy)."""
        self.load_clip()
        adapter = self.working_adapter(state)
        adapter.eval()
        preds, ent_sum = [], 0.0
        for start in range(0, len(ids), EVAL_BATCH):
            v = self.image_embeddings(ids[start : start + EVAL_BATCH])
            preds.append((adapter(v) @ self.text.t()).argmax(1).cpu())
            ent_sum += float(gate_entropy(adapter.gate(v))) * len(v)
        pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
        return pred, ent_sum / max(len(ids), 1)

    def _domain_name(self, ids: np.ndarray, fallback: str) -> str:
        ds = self.ctx.dataset
        if ds is not None and ds.domain_names and len(ids):
            doms = np.unique(np.asarray(ds.domains)[ids])
            if len(doms) == 1:
                return ds.domain_names[int(doms[0])]
        return fallback

    def _norm(self, state: State) -> float:
        return math.sqrt(sum(float((t.double() ** 2).sum()) for t in state.values()))

    def evaluate(self, state: State, test: ClientData) -> dict:
        """Global test set (per_domain: the held-out domains, out-of-federation): the classification
        metrics, `domain/<name>/test_acc` per held-out domain, `adapter_weight_norm`, `gate_entropy`.
        With several held-out domains `accuracy` is the mean of their accuracies (the reference's
        AVG over target domains); per-class and shot-group metrics pool their images."""
        ids = np.asarray(test.sample_ids, dtype=np.int64)
        pred, ent = self._predict(state, ids)
        out = classification_metrics(pred, test.labels, self.ctx.train_class_counts)
        ds = self.ctx.dataset
        if ds is not None and ds.domain_names and len(ids):
            domains = np.asarray(ds.domains)[ids]
            correct = (pred == test.labels.cpu()).numpy()
            accs = [float(correct[domains == d].mean()) for d in np.unique(domains)]
            for d, acc in zip(np.unique(domains), accs):
                out[f"domain/{ds.domain_names[int(d)]}/test_acc"] = acc
            out["accuracy"] = float(np.mean(accs))
        out["adapter_weight_norm"] = self._norm(state)
        out["gate_entropy"] = ent
        return out

    def evaluate_clients(self, state: State, clients: dict[int, dict[str, ClientData]]) -> dict:
        """Global adapter on each client's own splits after aggregation, as the reference scores them
        every round (spec §6; in-federation, the reference's "personalization" numbers):
        `domain/<name>/{train,val,test}_acc` (client<id> without domains), their means
        `train_accuracy`, `val_accuracy` (model selection) and `in_federation_acc`, `val_gate_entropy`."""
        out: dict[str, float] = {}
        trains, vals, tests, ents, weights = [], [], [], [], []
        for cid in sorted(clients):
            splits = clients[cid]
            test_ids = np.asarray(splits["test"].sample_ids, dtype=np.int64)
            name = self._domain_name(test_ids, f"client{cid}")
            for split, acc_list in (("train", trains), ("val", vals), ("test", tests)):
                data = splits.get(split)
                if data is None or not len(data.labels):
                    continue
                ids = np.asarray(data.sample_ids, dtype=np.int64)
                pred, ent = self._predict(state, ids)
                acc = float((pred == data.labels.cpu()).float().mean())
                out[f"domain/{name}/{split}_acc"] = acc
                acc_list.append(acc)
                if split == "val":
                    ents.append(ent)
                    weights.append(len(ids))
        if trains:
            out["train_accuracy"] = float(np.mean(trains))
        if tests:
            out["in_federation_acc"] = float(np.mean(tests))
        if vals:
            out["val_accuracy"] = float(np.mean(vals))
            out["val_gate_entropy"] = float(np.average(ents, weights=weights))
        out["adapter_weight_norm"] = self._norm(state)
        return out
