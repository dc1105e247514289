"""Exponential long-tail profile of the CLIP2FL / CReFF reference (`train_long_tail`, imb_type "exp").

Class i keeps n_i = int(n_max * (1/IF) ** (i / (C - 1))) samples, computed in float64 and
truncated, with n_max = N / C (a float); class 0 is the head, class C-1 keeps n_max / IF.
"""
from __future__ import annotations

import numpy as np

from fedplatform.errors import UserError


def longtail_counts(n_max: float, num_classes: int, imbalance_factor: float) -> np.ndarray:
    """Per-class counts `int(n_max * (1/IF) ** (i / (C - 1.0)))`, i = 0..C-1, as int64.

    IF = 1 gives int(n_max) for every class. Matches the reference tables exactly, e.g.
    CIFAR-10 (n_max 5000.0) at IF 100: 5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50.
    """
    if imbalance_factor < 1:
        raise UserError(
            f"data.imbalance_factor={imbalance_factor} is invalid; it must be >= 1 "
            "(1 = balanced, 100 = head class 100x the tail class)"
        )
    if num_classes == 1:  # the exponent i / (C - 1) is undefined; one class is its own head
        return np.array([int(n_max)], dtype=np.int64)
    # Python floats are float64; the operation order is the reference's.
    return np.array(
        [int(n_max * (1.0 / imbalance_factor) ** (i / (num_classes - 1.0))) for i in range(num_classes)],
        dtype=np.int64,
    )


def longtail_select(
    labels: np.ndarray, imbalance_factor: float, seed: int, num_classes: int | None = None
) -> np.ndarray:
    """Indices into `labels` kept by the long-tail profile, class-major.

    Reference behaviour: n_max = len(labels) / C; for c = 0..C-1 in order, class c's indices in
    ascending order are shuffled by one shared `np.random.RandomState(seed)` (legacy shuffle)
    and the first n_c are kept. The result lists class 0's kept indices first, in shuffled
    order, then class 1's, ...: exactly the input order the reference partition expects.

    Deviations for sources the reference never saw (documented, identical on CIFAR):
    - a class with fewer than n_c samples keeps all it has (unequal classes, e.g. digits);
    - IF = 1 keeps every sample of every class (no trimming of classes above the mean).

    `num_classes` defaults to max(label) + 1; pass it when the last classes may be absent.
    """
    labels = np.asarray(labels)
    C = int(num_classes if num_classes is not None else (labels.max() + 1 if len(labels) else 0))
    if C == 0:
        return np.zeros(0, dtype=np.int64)
    per_class = [np.flatnonzero(labels == c) for c in range(C)]
    if imbalance_factor == 1:
        wanted = np.array([len(idx) for idx in per_class], dtype=np.int64)
    else:
        wanted = longtail_counts(len(labels) / C, C, imbalance_factor)
    rs = np.random.RandomState(seed)
    kept = []
    for idx, n in zip(per_class, wanted):
        # Shuffling an int array draws the same swaps as the reference's shuffle of a list.
        rs.shuffle(idx)
        kept.append(idx[: min(int(n), len(idx))])
    return np.concatenate(kept).astype(np.int64)
