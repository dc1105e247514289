import functools
import math

import numpy as np
import pytest

from fedplatform.config import PartitionConfig
from fedplatform.data.longtail import longtail_select
from fedplatform.data.partition import Pool, clip2fl_workers, partition
from fedplatform.errors import UserError

# spec clip2fl 3.2: CIFAR-10, IF 100, seed 7, alpha 0.5, K 20
CIFAR10_IF100_HISTOGRAMS = """
37 11 321 32 103 113 4 0 0 0
294 171 4 23 45 3 33 7 39 2
293 174 71 0 83 0 0 0 0 0
3 618 0 0 0 0 0 0 0 0
150 17 362 12 19 61 0 0 0 0
89 195 3 161 64 19 24 46 6 14
614 0 0 0 0 0 0 0 2 4
620 0 0 0 0 0 0 0 0 0
289 267 64 0 0 0 0 0 0 0
139 55 74 277 3 1 55 13 2 1
0 0 84 251 137 128 6 0 0 14
13 607 0 0 0 0 0 0 0 0
369 251 0 0 0 0 0 0 0 0
427 54 139 0 0 0 0 0 0 0
620 0 0 0 0 0 0 0 0 0
402 218 0 0 0 0 0 0 0 0
60 107 238 24 49 53 58 3 24 4
197 47 303 73 0 0 0 0 0 0
244 71 1 186 48 8 7 49 1 5
140 134 132 38 94 1 45 21 9 6
"""


def longtail_pool(num_classes, per_class, imbalance_factor, seed=7):
    """Labels with the official CIFAR count structure (class-sorted: the histograms depend on
    the labels only through the class-major order longtail_select produces)."""
    labels = np.repeat(np.arange(num_classes), per_class)
    return Pool(labels[longtail_select(labels, imbalance_factor, seed)], num_classes)


def histograms(pool, result):
    return np.array([np.bincount(pool.labels[c["train"]], minlength=pool.num_classes) for c in result.clients])


def cfg(**kw):
    return PartitionConfig(**kw)


def reference_clients_indices(list_label2indices, num_classes, num_clients, non_iid_alpha, seed):
    """Transcription of the reference `clients_indices` (CReFF/CLIP2FL Dataset/sample_dirichlet.py)."""
    indices2targets = []
    for label, indices in enumerate(list_label2indices):
        for idx in indices:
            indices2targets.append((idx, label))
    random_state = np.random.RandomState(seed)
    n_auxi_workers, n_workers, num_indices = 10, num_clients, len(indices2targets)
    random_state.shuffle(indices2targets)
    from_index, splitted_targets = 0, []
    num_splits = math.ceil(n_workers / n_auxi_workers)
    for idx in range(num_splits):
        to_index = from_index + int(n_auxi_workers / n_workers * num_indices)
        splitted_targets.append(indices2targets[from_index : (num_indices if idx == num_splits - 1 else to_index)])
        from_index = to_index
    idx_batch = []
    for _targets in splitted_targets:
        _targets = np.array(_targets)
        _targets_size = len(_targets)
        _n_workers = min(n_auxi_workers, n_workers)
        n_workers = n_workers - n_auxi_workers
        min_size = 0
        while min_size < int(0.50 * _targets_size / _n_workers):
            _idx_batch = [[] for _ in range(_n_workers)]
            for _class in range(num_classes):
                idx_class = _targets[np.where(_targets[:, 1] == _class)[0], 0]
                proportions = random_state.dirichlet(np.repeat(non_iid_alpha, _n_workers))
                proportions = np.array(
                    [p * (len(idx_j) < _targets_size / _n_workers) for p, idx_j in zip(proportions, _idx_batch)]
                )
                with np.errstate(divide="ignore", invalid="ignore"):
                    proportions = proportions / proportions.sum()
                    proportions = (np.cumsum(proportions) * len(idx_class)).astype(int)[:-1]
                _idx_batch = [idx_j + idx.tolist() for idx_j, idx in zip(_idx_batch, np.split(idx_class, proportions))]
                min_size = min(len(idx_j) for idx_j in _idx_batch)
        idx_batch += _idx_batch
    flat = functools.reduce(lambda x, y: x + y, idx_batch)
    num_per_part, r = len(flat) // num_clients, len(flat) % num_clients
    parts, i, r_used = [], 0, 0
    while i < len(flat):
        step = num_per_part + 1 if r_used < r else num_per_part
        r_used += r_used < r
        parts.append(flat[i : i + step])
        i += step
    return parts


# ---------------------------------------------------------------------------- clip2fl_reference


def test_clip2fl_reference_reproduces_the_cifar10_if100_histograms():
    pool = longtail_pool(10, 5000, 100)
    result = partition(pool, cfg(scheme="clip2fl_reference", num_clients=20, dirichlet_alpha=0.5), seed=7)
    expected = np.array([[int(x) for x in row.split()] for row in CIFAR10_IF100_HISTOGRAMS.strip().splitlines()])
    assert histograms(pool, result).tolist() == expected.tolist()


def test_clip2fl_reference_cifar10_if100_properties():
    pool = longtail_pool(10, 5000, 100)
    hist = histograms(pool, partition(pool, cfg(scheme="clip2fl_reference", num_clients=20), seed=7))
    assert sorted(set(hist.sum(1).tolist())) == [620, 621]
    assert [k for k in range(20) if hist[k, 0] == hist[k].sum()] == [7, 14]  # class 0 only
    assert int(((hist > 0).sum(1) == 10).sum()) == 6  # clients holding all ten classes


def test_clip2fl_reference_chunks_are_6203_and_6203_for_cifar10_if100():
    pool = longtail_pool(10, 5000, 100)
    workers = clip2fl_workers(pool.labels, 10, 20, 0.5, np.random.RandomState(7))
    assert [sum(map(len, workers[:10])), sum(map(len, workers[10:]))] == [6203, 6203]


@pytest.mark.parametrize(
    "imbalance_factor, sizes, class_range",
    [(100, [542, 543], (21, 92)), (50, [630, 631], None), (10, [978, 979], None)],
)
def test_clip2fl_reference_cifar100_client_sizes(imbalance_factor, sizes, class_range):
    pool = longtail_pool(100, 500, imbalance_factor)
    hist = histograms(pool, partition(pool, cfg(scheme="clip2fl_reference", num_clients=20), seed=7))
    assert sorted(set(hist.sum(1).tolist())) == sizes
    if class_range:
        present = (hist > 0).sum(1)
        assert (present.min(), present.max()) == class_range


@pytest.mark.parametrize("num_clients, imbalance_factor, alpha", [(20, 100, 0.5), (25, 50, 0.5), (30, 10, 0.1)])
def test_clip2fl_reference_equals_the_reference_transcription(num_clients, imbalance_factor, alpha):
    # Official CIFAR order is interleaved, so real dataset indices differ from pool positions;
    # the clients' index lists must still match the reference's exactly.
    labels = np.random.default_rng(3).permutation(np.repeat(np.arange(10), 2000))
    kept = longtail_select(labels, imbalance_factor, seed=7)
    pool = Pool(labels[kept], 10)
    ours = partition(pool, cfg(scheme="clip2fl_reference", num_clients=num_clients, dirichlet_alpha=alpha), seed=7)
    per_class = [kept[labels[kept] == c].tolist() for c in range(10)]
    theirs = reference_clients_indices(per_class, 10, num_clients, alpha, 7)
    assert [kept[c["train"]].tolist() for c in ours.clients] == [list(map(int, p)) for p in theirs]


def test_clip2fl_reference_histograms_depend_only_on_class_counts():
    counts = [300, 120, 60, 20]
    sorted_labels = np.repeat(np.arange(4), counts)
    shuffled = np.random.default_rng(0).permutation(sorted_labels)
    hists = []
    for labels in (sorted_labels, shuffled):
        pool = Pool(labels[longtail_select(labels, 1, seed=7)], 4)  # class-major, whatever the index order
        hists.append(histograms(pool, partition(pool, cfg(scheme="clip2fl_reference", num_clients=10), seed=7)))
    assert np.array_equal(*hists)


def test_clip2fl_reference_needs_ten_clients():
    with pytest.raises(UserError, match="at least 10 clients"):
        partition(longtail_pool(10, 100, 1), cfg(scheme="clip2fl_reference", num_clients=5), seed=7)


# ---------------------------------------------------------------------------- dirichlet, iid


def assert_exact_cover(result, n):
    ids = np.concatenate([c["train"] for c in result.clients])
    assert sorted(ids.tolist()) == list(range(n))


def test_dirichlet_respects_min_client_size_and_covers_the_pool():
    pool = longtail_pool(10, 200, 10)
    result = partition(pool, cfg(scheme="dirichlet", num_clients=20, dirichlet_alpha=0.1, min_client_size=15), seed=1)
    assert min(len(c["train"]) for c in result.clients) >= 15
    assert_exact_cover(result, len(pool))


def test_dirichlet_is_seeded():
    pool = longtail_pool(10, 200, 10)
    c = cfg(scheme="dirichlet", num_clients=10, dirichlet_alpha=0.5)
    a, b, other = (partition(pool, c, seed=s) for s in (5, 5, 6))
    assert all(np.array_equal(x["train"], y["train"]) for x, y in zip(a.clients, b.clients))
    assert not np.array_equal(histograms(pool, a), histograms(pool, other))


def test_dirichlet_small_alpha_is_more_skewed():
    pool = longtail_pool(10, 500, 1)

    def mean_classes(alpha):
        result = partition(pool, cfg(scheme="dirichlet", num_clients=10, dirichlet_alpha=alpha), seed=0)
        return (histograms(pool, result) > 0).sum(1).mean()

    assert mean_classes(0.05) < mean_classes(100.0)


def test_dirichlet_impossible_min_size_fails_at_once():
    with pytest.raises(UserError, match="min_client_size=50 x num_clients=10 needs 500"):
        partition(Pool(np.repeat(np.arange(2), 100), 2), cfg(scheme="dirichlet", num_clients=10, min_client_size=50), 0)


def test_dirichlet_gives_up_after_bounded_draws():
    pool = Pool(np.repeat(np.arange(10), 10), 10)  # min_client_size = N / K: every client exactly 10
    with pytest.raises(UserError, match="found no split.*1000 draws"):
        partition(pool, cfg(scheme="dirichlet", num_clients=10, dirichlet_alpha=0.01, min_client_size=10), 0)


def test_iid_is_an_equal_seeded_split():
    pool = longtail_pool(10, 100, 1)
    result = partition(pool, cfg(scheme="iid", num_clients=7), seed=3)
    assert [len(c["train"]) for c in result.clients] == [143] * 6 + [142]
    assert_exact_cover(result, len(pool))
    again = partition(pool, cfg(scheme="iid", num_clients=7), seed=3)
    assert np.array_equal(result.clients[0]["train"], again.clients[0]["train"])


# ---------------------------------------------------------------------------- per_domain

DOMAINS = ["art_painting", "cartoon", "photo", "sketch"]
SIZES = [2048, 2344, 1670, 3929]  # PACS


def pacs_pool():
    domains = np.repeat(np.arange(4), SIZES).astype(np.int16)
    labels = np.concatenate([np.arange(n) % 7 for n in SIZES])
    return Pool(labels, 7, domains, DOMAINS)


def test_per_domain_splits_every_participating_domain_60_20_20():
    pool = pacs_pool()
    result = partition(pool, cfg(scheme="per_domain", num_clients=3), seed=0, test_domain="art_painting")
    sizes = [[len(c[s]) for s in ("train", "val", "test")] for c in result.clients]
    assert sizes == [[1406, 468, 468], [1002, 334, 334], [2357, 785, 785]]  # spec fedclip 3
    assert sorted(result.global_test.tolist()) == list(range(2048))  # the held-out domain, whole
    for d, client in zip([1, 2, 3], result.clients):
        ids = np.concatenate(list(client.values()))
        assert len(np.unique(ids)) == len(ids) and np.all(pool.domains[ids] == d)


def test_per_domain_split_follows_a_fresh_randomstate_permutation():
    pool = pacs_pool()
    result = partition(pool, cfg(scheme="per_domain", num_clients=3), seed=0, test_domain="sketch")
    perm = np.random.RandomState(0).permutation(2344)
    cartoon = np.flatnonzero(pool.domains == 1)
    assert np.array_equal(result.clients[1]["train"], cartoon[perm[:1406]])
    assert np.array_equal(result.clients[1]["val"], cartoon[perm[1406 : 1406 + 468]])


def test_per_domain_without_test_domain_uses_every_domain():
    result = partition(pacs_pool(), cfg(scheme="per_domain", num_clients=4), seed=0)
    assert len(result.clients) == 4 and len(result.global_test) == 0


def test_per_domain_num_clients_must_match_the_domains():
    with pytest.raises(UserError, match="num_clients=10 .* set partition.num_clients=3"):
        partition(pacs_pool(), cfg(scheme="per_domain", num_clients=10), seed=0, test_domain="photo")


def test_per_domain_unknown_test_domain_lists_the_domains():
    with pytest.raises(UserError, match="test_domain='paintings'.*art_painting, cartoon, photo, sketch"):
        partition(pacs_pool(), cfg(scheme="per_domain", num_clients=3), seed=0, test_domain="paintings")


def test_per_domain_needs_domains():
    with pytest.raises(UserError, match="needs a dataset with domains"):
        partition(longtail_pool(10, 10, 1), cfg(scheme="per_domain", num_clients=1), seed=0)


# ---------------------------------------------------------------------------- input errors


def test_more_clients_than_samples_is_a_user_error():
    with pytest.raises(UserError, match="num_clients=50 exceeds the 30 samples"):
        partition(Pool(np.repeat(np.arange(3), 10), 3), cfg(scheme="iid", num_clients=50), seed=0)


def test_unknown_scheme_lists_the_registered_ones():
    expected = "'shards' is not a registered partitioner; choose one of: clip2fl_reference, dirichlet, iid, per_domain"
    with pytest.raises(UserError, match=expected):
        partition(Pool(np.arange(10) % 2, 2), cfg(scheme="shards", num_clients=2), seed=0)


def test_test_domain_is_rejected_outside_per_domain():
    with pytest.raises(UserError, match="only applies to the per_domain"):
        partition(pacs_pool(), cfg(scheme="iid", num_clients=3), seed=0, test_domain="photo")
