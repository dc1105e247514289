"""Federated-features machinery shared by CReFF and CLIP2FL (spec clip2fl §3.3 DSA, §4.2, §4.3, §5, §10).

Client side: per-class gradients of the classifier (W, b) on real data (`real_class_gradients`).
Server side: per-class gradient averaging (`aggregate_class_gradients`), synthetic classifier
gradients in closed form batched over classes (`synthetic_class_gradients`), the gradient-matching
loss (`gradient_matching_loss`), the prototype contrastive loss in its N x C closed form
(`prototype_contrastive_loss`), the feature update (`update_features`) and classifier re-training
(`retrain_classifier`). Everything random draws from an explicit `torch.Generator`; the reference's
clock-seeded DSA that re-seeds the global RNG (§9.3) is replaced by the caller's generator
(documented deviation). Nothing here builds an N x N matrix (N = m·C features), except the
optional paper form of the PCL.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

GRADIENT_DRAWS = 10
"""Mini-batches per class averaged into a client's class gradient (a constant in the reference)."""
COS_EPS = 1e-6
"""Added to the product of norms in every cosine of the reference `distance_wb` / `match_loss`."""
CHUNK_ELEMENTS = 1 << 24
"""Synthetic gradients are formed for as many classes at once as fit in this many floats."""


# ---------------------------------------------------------------------------- DSA


def _uniform(generator: torch.Generator) -> float:
    return float(torch.rand(1, generator=generator, device=generator.device))


def _dsa_color(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    x = x + (_uniform(g) - 0.5) * 1.0  # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_uniform(g) * 2.0) + mean  # saturation
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (_uniform(g) + 0.5) + mean  # contrast


def _dsa_crop(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Integer translation by (dy, dx) in [-s, s]^2, s = int(H * 0.125 + 0.5) (4 at 32 px), zero fill."""
    h, w = x.shape[-2:]
    s = int(h * 0.125 + 0.5)
    dy = int(torch.randint(-s, s + 1, (1,), generator=g, device=g.device))
    dx = int(torch.randint(-s, s + 1, (1,), generator=g, device=g.device))
    padded = F.pad(x, (s, s, s, s))
    return padded[..., s + dy : s + dy + h, s + dx : s + dx + w]


def _dsa_cutout(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Zero a (H/2)-square (16 at 32 px) centred at a uniform integer position in [0, H]^2, clipped."""
    h, w = x.shape[-2:]
    size = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)
    cy = int(torch.randint(0, h + (1 - size[0] % 2), (1,), generator=g, device=g.device))
    cx = int(torch.randint(0, w + (1 - size[1] % 2), (1,), generator=g, device=g.device))
    y0, y1 = max(cy - size[0] // 2, 0), min(cy - size[0] // 2 + size[0], h)
    x0, x1 = max(cx - size[1] // 2, 0), min(cx - size[1] // 2 + size[1], w)
    out = x.clone()
    out[..., y0:y1, x0:x1] = 0
    return out


def _dsa_flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return x.flip(-1) if _uniform(g) < 0.5 else x


def _affine(x: torch.Tensor, theta: list[list[float]]) -> torch.Tensor:
    t = torch.tensor(theta, dtype=x.dtype, device=x.device).expand(len(x), 2, 3)
    grid = F.affine_grid(t, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def _dsa_scale(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    lo, hi = 1.0 / 1.2, 1.2
    sx, sy = _uniform(g) * (hi - lo) + lo, _uniform(g) * (hi - lo) + lo
    return _affine(x, [[sx, 0.0, 0.0], [0.0, sy, 0.0]])


def _dsa_rotate(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    angle = (_uniform(g) - 0.5) * 2 * 15 / 180 * math.pi
    return _affine(x, [[math.cos(angle), math.sin(-angle), 0.0], [math.sin(angle), math.cos(angle), 0.0]])


DSA_FAMILIES: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "color": _dsa_color, "crop": _dsa_crop, "cutout": _dsa_cutout,
    "flip": _dsa_flip, "scale": _dsa_scale, "rotate": _dsa_rotate,
}
DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"


def dsa(x: torch.Tensor, generator: torch.Generator, strategy: str = DSA_STRATEGY) -> torch.Tensor:
    """Siamese differentiable augmentation (DSA, mode 'S'): one family drawn uniformly from
    `strategy`, one parameter draw shared by the whole normalised batch [B, C, H, W]."""
    families = strategy.split("_")
    pick = int(torch.randint(0, len(families), (1,), generator=generator, device=generator.device))
    return DSA_FAMILIES[families[pick]](x, generator)


# ---------------------------------------------------------------------------- client: real gradients


def classifier_gradient(z: torch.Tensor, label: int, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dW, db) of mean CE(z W^T + b, label) for features z [B, d] of one class:
    dW = (1/B) sum_i (softmax_i - e_c) z_i^T, db = (1/B) sum_i (softmax_i - e_c)."""
    delta = torch.softmax(z @ weight.t() + bias, dim=1)
    delta[:, label] -= 1.0
    return delta.t() @ z / len(z), delta.mean(0)


@torch.no_grad()
def real_class_gradients(features: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
                         weight: torch.Tensor, bias: torch.Tensor, generator: torch.Generator, batch_real: int = 32,
                         form: str = "reference", draws: int = GRADIENT_DRAWS) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{c: (g_W [C, d], g_b [C])} for every class present in `labels` (ascending), spec §4.2 step 1.

    `features` maps normalised images to the penultimate z (the caller puts BN in eval mode);
    (weight, bias) is the classifier phi-hat. reference: for draw in 1..10, for each class, sample
    min(batch_real, n_c) images without replacement, one DSA call, gradient of the mean CE w.r.t. the
    classifier only; average of the 10. paper: the mean CE gradient over all class-c samples, no DSA."""
    classes = [int(c) for c in torch.unique(labels).tolist()]
    members = {c: torch.nonzero(labels == c).flatten() for c in classes}
    if form == "paper":
        out = {}
        for c in classes:
            z = torch.cat([features(images[members[c][i : i + 256]]) for i in range(0, len(members[c]), 256)])
            out[c] = classifier_gradient(z, c, weight, bias)
        return out
    sums = {c: (torch.zeros_like(weight), torch.zeros_like(bias)) for c in classes}
    for _ in range(draws):
        for c in classes:
            idx = members[c]
            pick = torch.randperm(len(idx), generator=generator, device=generator.device)[:batch_real].to(idx.device)
            x = dsa(images[idx[pick]], generator)
            gw, gb = classifier_gradient(features(x), c, weight, bias)
            sums[c][0].add_(gw)
            sums[c][1].add_(gb)
    return {c: (gw / draws, gb / draws) for c, (gw, gb) in sums.items()}


# ---------------------------------------------------------------------------- server


class ClassGradientSum:
    """Streaming `aggregate_class_gradients`: clients folded in one at a time, same operations in
    the same order, so `result()` is bit-identical to the list form."""

    def __init__(self):
        self.sums: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.total: dict[int, float] = {}

    def add(self, grads: dict[int, tuple[torch.Tensor, torch.Tensor]], counts: dict[int, int] | None = None) -> None:
        for c, (gw, gb) in grads.items():
            w = float(counts[c]) if counts is not None else 1.0
            if c in self.sums:
                self.sums[c] = (self.sums[c][0] + w * gw, self.sums[c][1] + w * gb)
                self.total[c] += w
            else:
                self.sums[c] = (w * gw, w * gb)
                self.total[c] = w

    def result(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        return {c: (gw / self.total[c], gb / self.total[c]) for c, (gw, gb) in sorted(self.sums.items())}


def aggregate_class_gradients(client_grads: list[dict[int, tuple[torch.Tensor, torch.Tensor]]],
                              counts: list[dict[int, int]] | None = None) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """g_c = mean of g_c^k over the clients holding class c (spec §4.3 step 2), in list order;
    weighted by n_c^k when `counts` is given (§9.7 option). Classes no client holds are absent."""
    acc = ClassGradientSum()
    for k, grads in enumerate(client_grads):
        acc.add(grads, counts[k] if counts is not None else None)
    return acc.result()


def synthetic_class_gradients(features: torch.Tensor, classes: torch.Tensor, weight: torch.Tensor,
                              bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Analytic classifier gradients of the mean CE over each class's features, batched (spec §10):
    features [k, m, d] (class classes[j]'s m rows), weight [C, d], bias [C] ->
    (dW [k, C, d], db [k, C]); differentiable in `features` (equals autograd with create_graph)."""
    k, m, _ = features.shape
    delta = torch.softmax(features @ weight.t() + bias, dim=-1)  # [k, m, C]
    delta = delta - F.one_hot(classes, weight.shape[0]).to(delta.dtype)[:, None, :]
    return torch.einsum("kmc,kmd->kcd", delta, features) / m, delta.mean(1)


def _rowwise_cos_distance(s: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """sum over rows of 1 - <s_j, r_j> / (|s_j| |r_j| + 1e-6); s, r [k, rows, d] -> [k]."""
    dots = (s * r).sum(-1)
    return (1 - dots / (s.norm(dim=-1) * r.norm(dim=-1) + COS_EPS)).sum(-1)


def gradient_matching_loss(syn_w: torch.Tensor, syn_b: torch.Tensor, real_w: torch.Tensor, real_b: torch.Tensor,
                           metric: str = "ours", form: str = "reference") -> torch.Tensor:
    """GML summed over a batch of classes (spec §5.2); inputs [k, C, d] and [k, C].
    ours/reference: sum_j (1 - cos(W_s[j], W_r[j])) + (1 - cos(b_s, b_r)) (each cosine with +1e-6 in
    the denominator); ours/paper: (1/C) sum_j (1 - cos(W_s[j], W_r[j])), weight rows only;
    mse: sum of (syn - real)^2 over [W, b]; cos: 1 - cos of the concatenated [W, b] vectors."""
    if metric == "ours":
        rows = _rowwise_cos_distance(syn_w, real_w)
        if form == "paper":
            return (rows / syn_w.shape[1]).sum()
        return (rows + _rowwise_cos_distance(syn_b[:, None, :], real_b[:, None, :])).sum()
    s = torch.cat([syn_w.flatten(1), syn_b], dim=1)
    r = torch.cat([real_w.flatten(1), real_b], dim=1)
    if metric == "mse":
        return ((s - r) ** 2).sum()
    if metric == "cos":
        return (1 - (s * r).sum(1) / (s.norm(dim=1) * r.norm(dim=1) + COS_EPS)).sum()
    raise ValueError(f"dis_metric={metric!r} is not one of ours, mse, cos")


def prototype_contrastive_loss(features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, temperature: float,
                               per_class: int) -> torch.Tensor:
    """Reference PCL (`SupConLoss_text`, spec §5.3) in closed form, N x C instead of N x N:
    with s_ic = <v_i, t_c>/tau and m features per class,
    L_i = -s_{i,y_i} + log[(m - 1) exp(s_{i,y_i}) + m sum_{c != y_i} exp(s_ic)]
        = CE(s_i, y_i) + log m + log(1 - p_{i,y_i} / m),  p_i = softmax(s_i); mean over i.
    The second form needs one N x C matrix (p_{i,y_i} / m <= 1/2, so the log1p is stable).
    With m = 1 no anchor has a positive pair, so every anchor is dropped and the loss is 0."""
    if per_class < 2:
        return features.sum() * 0.0
    s = features @ text.t() / temperature  # [N, C]
    lse = torch.logsumexp(s, dim=1)
    own_logit = s.gather(1, labels[:, None]).squeeze(1)
    own_prob = torch.exp(own_logit - lse)
    return (lse - own_logit + math.log(per_class) + torch.log1p(-own_prob / per_class)).mean()


def prototype_contrastive_loss_literal(features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor,
                                       temperature: float) -> torch.Tensor:
    """The reference `SupConLoss_text` computed literally with N x N matrices (tests, small N)."""
    n = len(labels)
    contrast = text[labels]  # T_rep aligned with the labels
    logits = features @ contrast.t() / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    not_self = ~torch.eye(n, dtype=torch.bool, device=features.device)
    positive = (labels[:, None] == labels[None, :]) & not_self
    log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(1, keepdim=True))
    pos_count = positive.sum(1)
    keep = pos_count > 0
    mean_log_prob_pos = (log_prob * positive).sum(1)[keep] / pos_count[keep]
    return -mean_log_prob_pos.mean()


def prototype_contrastive_loss_paper(features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor,
                                     temperature: float, chunk: int = 4096) -> torch.Tensor:
    """Paper form (spec §8, unconfirmed transcription): mean_i -log[exp(<v_i, t_{y_i}>/tau) /
    sum_{j != i} exp(<v_i, v_j>/tau)]. Needs N x N similarities (computed in row chunks); the mean
    (not the sum) over anchors keeps its scale comparable with the reference form."""
    own = (features * text[labels]).sum(1) / temperature
    parts = []
    for start in range(0, len(features), chunk):
        sim = features[start : start + chunk] @ features.t() / temperature
        rows = torch.arange(start, start + len(sim), device=features.device)
        sim = sim.index_put((torch.arange(len(sim), device=features.device), rows),
                            torch.tensor(-math.inf, device=sim.device, dtype=sim.dtype))
        parts.append(torch.logsumexp(sim, dim=1))
    return (torch.cat(parts) - own).mean()


def init_features(num_classes: int, per_class: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """V ~ N(0, 1), [m·C, d], class-major (rows c·m .. c·m + m - 1 belong to class c)."""
    return torch.randn(num_classes * per_class, dim, generator=generator, device=generator.device)


def feature_labels(num_classes: int, per_class: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """y_V = [0]*m + [1]*m + ... (class-major)."""
    return torch.arange(num_classes, device=device).repeat_interleave(per_class)


def update_features(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    real: dict[int, tuple[torch.Tensor, torch.Tensor]], steps: int, lr: float,
                    metric: str = "ours", gml_form: str = "reference",
                    contrast: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    contrast_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Spec §4.3 step 3: `steps` full-batch SGD steps (lr, no momentum) on V with phi-hat = (weight,
    bias) fixed, loss = sum_{c in Omega} GML(grad CE(phi-hat(V_c), c), g_c) + contrast_weight ·
    contrast(V). The GML is formed for chunks of classes and back-propagated chunk by chunk (memory
    bounded by CHUNK_ELEMENTS at 1,000 classes). Returns (new V, {"gml": .., "pcl": ..} of the last step)."""
    num_classes, dim = weight.shape
    per_class = len(features) // num_classes
    v = features.detach().clone()
    weight, bias = weight.detach(), bias.detach()
    classes = sorted(real)
    chunk = max(1, CHUNK_ELEMENTS // max(1, num_classes * dim))
    stats = {"gml": float("nan"), "pcl": float("nan")}
    if not classes and (contrast is None or contrast_weight == 0):
        return v, stats
    blocks = []
    for i in range(0, len(classes), chunk):
        cls = classes[i : i + chunk]
        blocks.append((torch.tensor(cls, device=v.device),
                       torch.stack([real[c][0] for c in cls]).to(v.device),
                       torch.stack([real[c][1] for c in cls]).to(v.device)))
    for _ in range(steps):
        v.requires_grad_(True)
        view = v.view(num_classes, per_class, dim)
        gml_sum = torch.zeros((), device=v.device)
        for cls, rw, rb in blocks:
            sw, sb = synthetic_class_gradients(view[cls], cls, weight, bias)
            loss = gradient_matching_loss(sw, sb, rw, rb, metric, gml_form)
            loss.backward()
            gml_sum += loss.detach()
        pcl = None
        if contrast is not None and contrast_weight != 0:
            pcl = contrast(v)
            (contrast_weight * pcl).backward()
        with torch.no_grad():
            grad = v.grad
            v = (v - lr * grad).detach()
        stats = {"gml": float(gml_sum), "pcl": float(pcl.detach()) if pcl is not None else float("nan")}
    return v, stats


def retrain_classifier(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       epochs: int, lr: float, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Spec §4.3 step 4: SGD (lr, no momentum) on mean CE over (V, y_V) from the fresh classifier
    (weight, bias), `epochs` passes reshuffled by a permutation drawn on the device, batches of
    `batch_size` with the last partial one kept. The CE gradient of a linear layer is applied in
    closed form (same update as autograd + torch.optim.SGD, without its per-step overhead)."""
    x = features.detach()
    w, b = weight.detach().clone(), bias.detach().clone()
    n = len(x)
    onehot = F.one_hot(labels, w.shape[0]).to(x.dtype)
    with torch.no_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator, device=generator.device).to(x.device)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                xb = x[idx]
                delta = torch.softmax(xb @ w.t() + b, dim=1) - onehot[idx]
                scale = lr / len(idx)
                w.sub_(delta.t() @ xb, alpha=scale)
                b.sub_(delta.sum(0), alpha=scale)
    return w, b


def fresh_classifier(dim: int, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's default nn.Linear(dim, C) init drawn from `seed` (global RNG left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = nn.Linear(dim, num_classes)
    return layer.weight.detach().clone(), layer.bias.detach().clone()
