import numpy as np
import pytest

from fedplatform.data.longtail import longtail_counts, longtail_select
from fedplatform.errors import UserError

# spec clip2fl 3.1
CIFAR10 = {
    100: [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50],
    50: [5000, 3237, 2096, 1357, 878, 568, 368, 238, 154, 100],
    10: [5000, 3871, 2997, 2320, 1796, 1391, 1077, 834, 645, 500],
}
CIFAR10_TOTAL = {100: 12406, 50: 13996, 10: 20431}
CIFAR100 = {
    100: """500 477 455 434 415 396 378 361 344 328 314 299 286 273 260 248 237 226 216 206 197 188 179 171 163
  156 149 142 135 129 123 118 112 107 102 98 93 89 85 81 77 74 70 67 64 61 58 56 53 51 48 46 44 42 40
  38 36 35 33 32 30 29 27 26 25 24 23 22 21 20 19 18 17 16 15 15 14 13 13 12 12 11 11 10 10 9 9 8 8 7 7 7 6 6 6 6 5 5 5 5""",
    50: """500 480 462 444 426 410 394 379 364 350 336 323 311 299 287 276 265 255 245 235 226 218 209 201 193
  186 178 172 165 158 152 146 141 135 130 125 120 115 111 107 102 98 95 91 87 84 81 78 75 72 69 66 64 61 59
  56 54 52 50 48 46 44 43 41 39 38 36 35 34 32 31 30 29 27 26 25 24 23 22 22 21 20 19 18 18 17 16 16 15 14 14 13 13 12 12 11 11 10 10 10""",
    10: """500 488 477 466 455 445 434 424 415 405 396 387 378 369 361 352 344 336 328 321 314 306 299 292 286
  279 273 266 260 254 248 243 237 232 226 221 216 211 206 201 197 192 188 183 179 175 171 167 163 159 156 152 149 145 142
  139 135 132 129 126 123 121 118 115 112 110 107 105 102 100 98 95 93 91 89 87 85 83 81 79 77 75 74 72 70 69 67 66 64 63 61 60 58 57 56 54 53 52 51 50""",
}
CIFAR100_TOTAL = {100: 10847, 50: 12608, 10: 19573}


@pytest.mark.parametrize("imbalance_factor", [100, 50, 10])
def test_cifar10_counts_equal_the_reference_table(imbalance_factor):
    counts = longtail_counts(50000 / 10, 10, imbalance_factor)
    assert counts.tolist() == CIFAR10[imbalance_factor]
    assert counts.sum() == CIFAR10_TOTAL[imbalance_factor]


@pytest.mark.parametrize("imbalance_factor", [100, 50, 10])
def test_cifar100_counts_equal_the_reference_table(imbalance_factor):
    counts = longtail_counts(50000 / 100, 100, imbalance_factor)
    assert counts.tolist() == [int(x) for x in CIFAR100[imbalance_factor].split()]
    assert counts.sum() == CIFAR100_TOTAL[imbalance_factor]


def test_imbalance_factor_one_is_balanced():
    assert longtail_counts(5000.0, 10, 1).tolist() == [5000] * 10


def test_imbalance_factor_below_one_is_a_user_error():
    with pytest.raises(UserError, match="imbalance_factor=0.5"):
        longtail_counts(5000.0, 10, 0.5)


def _reference_train_long_tail(labels, num_classes, imbalance_factor, seed):
    """Transcription of the reference `train_long_tail`: per-class Python lists shuffled in
    place by the global numpy RNG seeded once."""
    np.random.seed(seed)
    per_class = [[i for i, y in enumerate(labels) if y == c] for c in range(num_classes)]
    img_max = len(labels) / num_classes
    kept = []
    for c, indices in enumerate(per_class):
        n = int(img_max * ((1 / imbalance_factor) ** (c / (num_classes - 1.0))))
        np.random.shuffle(indices)
        kept += indices[:n]
    return kept


def test_selection_equals_the_reference_transcription():
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 300))  # interleaved, like CIFAR
    kept = longtail_select(labels, 50, seed=7)
    assert kept.tolist() == _reference_train_long_tail(labels.tolist(), 10, 50, 7)


def test_selection_is_class_major_with_the_profile_counts():
    labels = np.random.default_rng(1).permutation(np.repeat(np.arange(10), 5000))
    kept = longtail_select(labels, 100, seed=7)
    assert np.all(np.diff(labels[kept]) >= 0)  # class 0's indices first, then class 1's, ...
    assert np.bincount(labels[kept]).tolist() == CIFAR10[100]
    assert len(np.unique(kept)) == len(kept)


def test_selection_is_seeded():
    labels = np.repeat(np.arange(10), 100)
    assert np.array_equal(longtail_select(labels, 10, seed=3), longtail_select(labels, 10, seed=3))
    assert not np.array_equal(longtail_select(labels, 10, seed=3), longtail_select(labels, 10, seed=4))


def test_small_classes_keep_what_they_have():
    labels = np.array([0] * 5 + [1] * 100 + [2] * 100)  # n_max = 68.3: class 0 holds only 5
    kept = longtail_select(labels, 10, seed=0)
    assert np.bincount(labels[kept]).tolist() == [5, 21, 6]  # int(68.3 * 0.1 ** 0.5) = 21


def test_imbalance_factor_one_keeps_every_sample_of_unequal_classes():
    labels = np.array([0] * 5 + [1] * 100 + [2] * 7)
    kept = longtail_select(labels, 1, seed=0)
    assert sorted(kept.tolist()) == list(range(len(labels)))
    assert np.all(np.diff(labels[kept]) >= 0)


def test_absent_last_class_counts_in_n_max_when_num_classes_is_given():
    labels = np.repeat(np.arange(3), 40)  # classes 0..2 present of 4
    kept = longtail_select(labels, 10, seed=0, num_classes=4)
    assert np.bincount(labels[kept], minlength=4).tolist() == [30, 13, 6, 0]
