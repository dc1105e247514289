"""CReFF (Shang et al., IJCAI 2022, "Federated Learning on Heterogeneous and Long-Tailed Data via
Classifier Re-training with Federated Features") as in the CLIP2FL reference (spec clip2fl §4).

Client: per-class classifier gradients on the global backbone with the previous re-trained head
phi-hat (eval-mode BN, 10 DSA draws of <= 32 images per class, averaged), then FedAvg local training.
Server: FedAvg; per-class gradient means over the clients holding each class; `match_epoch` SGD
steps on the federated features V (m per class, N(0, 1) init, never re-initialised) on the
gradient-matching loss; a fresh Linear(d, C) re-trained on V for `crt_epoch` epochs -> new phi-hat.
Evaluation: FedAvg backbone + phi-hat (`accuracy`), and the plain FedAvg head beside it
(`fedavg_head_accuracy`). The broadcast model keeps the FedAvg head (spec §9.6).

State = the FedAvg model's flat state dict + `federated_features` [m·C, d] +
`retrained_classifier.{weight,bias}`: plain SGD has no optimizer state, so a checkpoint of the
state resumes exactly. Server randomness (V's init, each round's fresh classifier and shuffles) is
drawn from generators seeded by (run seed, round); client randomness from the client's generator
(documented deviation from the reference's clock-seeded DSA, spec §9.3).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from fedplatform.algorithms.base import (
    EVAL_BATCH_SIZE,
    ClientData,
    ClientUpdate,
    State,
    classification_metrics,
    draw_seed,
    register_algorithm,
    seeded_global_rng,
)
from fedplatform.algorithms.creff_config import CReFFConfig
from fedplatform.algorithms.fedavg import FedAvg, WeightedSum, local_sgd
from fedplatform.algorithms.images import student_images
from fedplatform.algorithms.federated_features import (
    ClassGradientSum,
    feature_labels,
    fresh_classifier,
    init_features,
    real_class_gradients,
    retrain_classifier,
    update_features,
)

FEATURES = "federated_features"
HEAD_W, HEAD_B = "retrained_classifier.weight", "retrained_classifier.bias"
GRAD_W, GRAD_B, COUNT = "grad_W.", "grad_b.", "class_count."
_EXTRA = (FEATURES, HEAD_W, HEAD_B)
_UPLOAD_PREFIXES = (GRAD_W, GRAD_B, COUNT)


def server_seed(seed: int, round: int, stream: int) -> int:
    """Seed of server RNG stream `stream` (0 V init, 1 fresh classifier, 2 re-training shuffles) in `round`."""
    return int(np.random.SeedSequence([seed, round, 0xC4EFF, stream]).generate_state(1, np.uint64)[0] >> 1)


def device_clock(device: torch.device) -> float:
    """perf_counter once `device` has finished its queued work (CUDA runs kernels asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def model_part(state: State) -> State:
    """The FedAvg network's entries of a state, payload or update."""
    return {k: v for k, v in state.items() if k not in _EXTRA and not k.startswith(_UPLOAD_PREFIXES)}


def uploaded_gradients(tensors: State) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], dict[int, int]]:
    """({c: (g_W, g_b)}, {c: n_c}) from a client update's tensors."""
    grads = {int(k[len(GRAD_W):]): (v, tensors[GRAD_B + k[len(GRAD_W):]]) for k, v in tensors.items() if k.startswith(GRAD_W)}
    counts = {int(k[len(COUNT):]): int(v) for k, v in tensors.items() if k.startswith(COUNT)}
    return dict(sorted(grads.items())), counts


@register_algorithm("creff", config=CReFFConfig)
class CReFF(FedAvg):
    """CReFF on the algorithm contract. Defaults (reference): m = 100 features per class,
    match_epoch 100 at lr_feature 0.1, crt_epoch 300 at lr_net 0.01 with batch `batch_size` (32),
    batch_real 32, dis_metric ours; local training = FedAvg's (SGD lr 0.1, 10 epochs, batch 32)."""

    predict_head = "retrained_classifier"

    def __init__(self, ctx):
        super().__init__(ctx)
        with seeded_global_rng(0):
            self.feature_dim = int(self.build_model().feature_dim)
        self.timings: dict[str, float] = {}
        """Seconds of the last `aggregate_finish`: fedavg_s (the streamed sums divided), match_s, retrain_s."""
        self.server_stats: dict[str, float] = {}

    @classmethod
    def inference_state(cls, state: State) -> State:
        """What `evaluate` scores `accuracy` with: the FedAvg network and phi-hat (V stays behind)."""
        return {**model_part(state), HEAD_W: state[HEAD_W], HEAD_B: state[HEAD_B]}

    # ------------------------------------------------------------------ hooks for CLIP2FL

    def contrast(self):
        """Extra feature loss fn(V) -> scalar, weighted by `contrast_weight` (CReFF: none)."""
        return None, 0.0

    # ------------------------------------------------------------------ contract

    def init_server_state(self, seed: int) -> State:
        state = super().init_server_state(seed)
        c, m, d = self.ctx.num_classes, self.cfg.num_features_per_class, self.feature_dim
        state[FEATURES] = init_features(c, m, d, torch.Generator().manual_seed(server_seed(seed, 0, 0)))
        state[HEAD_W], state[HEAD_B] = fresh_classifier(d, c, server_seed(seed, 0, 1))
        return state

    def broadcast(self, state: State) -> State:
        """The plain FedAvg model (with its own head) plus phi-hat; V stays on the server."""
        return {k: v for k, v in state.items() if k != FEATURES}

    def client_update(self, payload: State, data: ClientData, generator: torch.Generator) -> ClientUpdate:
        if len(data.labels) == 0:
            raise ValueError(f"client {data.client_id} has no training samples")
        device = self.ctx.device
        model = self.working_model(model_part(payload))
        images = student_images(data, self.ctx)
        labels = data.labels.to(device=device, dtype=torch.long)
        # Step 1: theta_g' = FedAvg backbone + phi-hat, BN in eval mode; only (W, b) get gradients.
        model.eval()
        grads = real_class_gradients(model.features, images, labels, payload[HEAD_W].to(device),
                                     payload[HEAD_B].to(device), generator, self.cfg.batch_real,
                                     self.cfg.real_gradient)
        # Step 2: local training from the FedAvg model.
        loss_fn = self.local_loss(payload, data)
        with seeded_global_rng(draw_seed(generator), device):
            train_loss = local_sgd(model, images, labels, self.cfg, generator, loss_fn)
        tensors = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        counts = torch.bincount(labels, minlength=self.ctx.num_classes).cpu()
        for c, (gw, gb) in grads.items():
            tensors[f"{GRAD_W}{c}"], tensors[f"{GRAD_B}{c}"] = gw.cpu(), gb.cpu()
            if self.cfg.gradient_weighting == "by_count":
                tensors[f"{COUNT}{c}"] = counts[c].clone()
        return ClientUpdate(data.client_id, len(labels), tensors,
                            {"train_loss": train_loss, "classes_present": float(len(grads))})

    def aggregate_start(self, state: State, round: int) -> tuple[WeightedSum, ClassGradientSum]:
        """FedAvg of the model and the per-class gradient sums both stream (client-id order)."""
        return WeightedSum(), ClassGradientSum()

    def aggregate_add(self, acc: tuple[WeightedSum, ClassGradientSum], update: ClientUpdate) -> None:
        acc[0].add(model_part(update.tensors), update.num_samples)
        grads, counts = uploaded_gradients(update.tensors)
        acc[1].add(grads, counts if self.cfg.gradient_weighting == "by_count" else None)

    def aggregate_finish(self, state: State, acc: tuple[WeightedSum, ClassGradientSum], round: int) -> State:
        device, seed = self.ctx.device, self.ctx.cfg.seed
        t0 = device_clock(device)
        new, real = acc[0].result(), acc[1].result()
        t1 = device_clock(device)
        contrast, eta = self.contrast()
        features, stats = update_features(
            state[FEATURES].to(device), state[HEAD_W].to(device), state[HEAD_B].to(device),
            {c: (gw.to(device), gb.to(device)) for c, (gw, gb) in real.items()},
            self.cfg.match_epoch, self.cfg.lr_feature, self.cfg.dis_metric, self.cfg.gml_form, contrast, eta)
        t2 = device_clock(device)
        c, m = self.ctx.num_classes, self.cfg.num_features_per_class
        w0, b0 = fresh_classifier(self.feature_dim, c, server_seed(seed, round, 1))
        gen = torch.Generator(device=device).manual_seed(server_seed(seed, round, 2))
        w, b = retrain_classifier(features, feature_labels(c, m, device), w0.to(device), b0.to(device),
                                  self.cfg.crt_epoch, self.cfg.lr_net, self.cfg.batch_size, gen)
        t3 = device_clock(device)
        self.timings = {"fedavg_s": t1 - t0, "match_s": t2 - t1, "retrain_s": t3 - t2}
        self.server_stats = {"gml": stats["gml"], "pcl": stats["pcl"], "matched_classes": float(len(real))}
        new[FEATURES] = features.cpu()
        new[HEAD_W], new[HEAD_B] = w.cpu(), b.cpu()
        return new

    @torch.no_grad()
    def evaluate(self, state: State, test: ClientData) -> dict:
        """FedAvg backbone + re-trained phi-hat: `accuracy`, `loss`, per-class and many/medium/few;
        the same backbone with the FedAvg head: `fedavg_head_accuracy` (+ `fedavg_head_*` groups);
        `federated_feature_norm` (mean row norm of V, which PCL can inflate, spec §9.8)."""
        device = self.ctx.device
        model = self.working_model(model_part(state))
        model.eval()
        w, b = state[HEAD_W].to(device), state[HEAD_B].to(device)
        labels = test.labels.to(device=device, dtype=torch.long)
        images = student_images(test, self.ctx)
        preds = {"retrained": [], "fedavg": []}
        losses = {"retrained": torch.zeros((), dtype=torch.float64, device=device),
                  "fedavg": torch.zeros((), dtype=torch.float64, device=device)}
        for start in range(0, len(labels), EVAL_BATCH_SIZE):
            x = images[start : start + EVAL_BATCH_SIZE]
            y = labels[start : start + EVAL_BATCH_SIZE]
            z = model.features(x)
            for key, logits in (("retrained", z @ w.t() + b), ("fedavg", model.classifier(z))):
                losses[key] += torch.nn.functional.cross_entropy(logits, y, reduction="sum").double()
                preds[key].append(logits.argmax(1).cpu())
        n = max(len(labels), 1)
        out = classification_metrics(torch.cat(preds["retrained"]), test.labels.cpu(), self.ctx.train_class_counts,
                                     loss=float(losses["retrained"] / n))
        head = classification_metrics(torch.cat(preds["fedavg"]), test.labels.cpu(), self.ctx.train_class_counts,
                                      loss=float(losses["fedavg"] / n))
        for key in ("accuracy", "many_shot_acc", "medium_shot_acc", "few_shot_acc", "loss"):
            if key in head:
                out[f"fedavg_head_{key}"] = head[key]
        out["federated_feature_norm"] = float(state[FEATURES].norm(dim=1).mean())
        return out
