"""Partitioners: split the (long-tailed) training pool over logical clients.

One entry point, `partition(pool, cfg, seed, test_domain)`; each scheme is a registered function
returning, for client ids 0..K-1, a dict split -> pool positions ("train", plus "val"/"test" for
per_domain), and the pool positions of an extra global test set (per_domain's held-out domain).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from fedplatform.config import PartitionConfig
from fedplatform.errors import UserError

MAX_ATTEMPTS = 1000
"""Redraws before a Dirichlet scheme gives up (the reference retries forever)."""


@dataclass
class Pool:
    """The training pool a partitioner splits: one entry per pool position."""

    labels: np.ndarray  # int64 [N]
    num_classes: int
    domains: np.ndarray | None = None  # int16 [N]; None = one domain
    domain_names: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.domains is None:
            self.domains = np.zeros(len(self.labels), dtype=np.int16)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Partition:
    clients: list[dict[str, np.ndarray]]  # client id -> split -> int64 pool positions
    global_test: np.ndarray  # pool positions of the extra global test set (may be empty)


@dataclass(frozen=True)
class Partitioner:
    fn: Callable[[Pool, PartitionConfig, int, str | list[str] | None], Partition]
    by_domain: bool
    """True: clients are domains; the pool comes in source order, un-long-tailed, and the
    partitioner itself provides the global test set (the held-out domain)."""


PARTITIONERS: dict[str, Partitioner] = {}


def register_partitioner(name: str, *, by_domain: bool = False):
    def deco(fn):
        PARTITIONERS[name] = Partitioner(fn, by_domain)
        return fn

    return deco


def get_partitioner(scheme: str) -> Partitioner:
    if scheme not in PARTITIONERS:
        raise UserError(
            f"partition.scheme={scheme!r} is not a registered partitioner; "
            f"choose one of: {', '.join(sorted(PARTITIONERS))}"
        )
    return PARTITIONERS[scheme]


def partition(pool: Pool, cfg: PartitionConfig, seed: int, test_domain: str | list[str] | None = None) -> Partition:
    """Split `pool` with the scheme `cfg.scheme`; every client gets at least one training sample."""
    spec = get_partitioner(cfg.scheme)
    if test_domain is not None and not spec.by_domain:
        raise UserError(
            f"data.test_domain={test_domain!r} only applies to the per_domain partition scheme "
            f"(partition.scheme={cfg.scheme!r}); remove it or use partition.scheme=per_domain"
        )
    if not spec.by_domain and cfg.num_clients > len(pool):
        raise UserError(
            f"partition.num_clients={cfg.num_clients} exceeds the {len(pool)} samples of the "
            f"training pool; use at most {len(pool)} clients (or a smaller data.imbalance_factor)"
        )
    result = spec.fn(pool, cfg, seed, test_domain)
    for cid, splits in enumerate(result.clients):
        if len(splits["train"]) == 0:
            raise UserError(
                f"partition.scheme={cfg.scheme!r} left client {cid} without training samples "
                f"(num_clients={cfg.num_clients}, pool of {len(pool)}); use fewer clients"
                + (" or a larger partition.min_client_size" if cfg.scheme == "dirichlet" else "")
            )
    return result


def _only_train(parts) -> Partition:
    return Partition([{"train": np.asarray(p, dtype=np.int64)} for p in parts], np.zeros(0, np.int64))


def _dirichlet_split(items, rng, alpha, lens, capacity):
    """The shared per-class step of the Dirichlet schemes: one Dirichlet(alpha) draw, the
    balance trick (zero the share of every worker holding >= capacity items), cut `items`."""
    p = rng.dirichlet(np.repeat(alpha, len(lens)))
    p = p * (lens < capacity)
    # Same operation order as the reference; 0/0 (all workers full, so no items left) gives
    # empty pieces there, and numpy's errors are silenced to behave alike.
    with np.errstate(divide="ignore", invalid="ignore"):
        p = p / p.sum()
        cuts = (np.cumsum(p) * len(items)).astype(int)[:-1]
    return np.split(items, cuts)


# ---------------------------------------------------------------------------- schemes


@register_partitioner("iid")
def iid(pool: Pool, cfg: PartitionConfig, seed: int, test_domain=None) -> Partition:
    """Seeded uniform shuffle (np.random.default_rng(seed)), cut into K contiguous parts whose
    sizes differ by at most one (the first N mod K clients get one more)."""
    perm = np.random.default_rng(seed).permutation(len(pool))
    return _only_train(np.array_split(perm, cfg.num_clients))


@register_partitioner("dirichlet")
def dirichlet(pool: Pool, cfg: PartitionConfig, seed: int, test_domain=None) -> Partition:
    """Per-class Dirichlet(alpha) label skew (Hsu et al. 2019; NIID-Bench form).

    With np.random.default_rng(seed): for each class, shuffle its samples, draw client shares
    p ~ Dir(alpha), zero the share of clients already holding >= N/K samples (balance trick),
    renormalise and cut. Redraw everything until every client holds >= min_client_size
    samples; give up after MAX_ATTEMPTS draws.
    """
    K, N, need = cfg.num_clients, len(pool), cfg.min_client_size
    if K * need > N:
        raise UserError(
            f"partition.min_client_size={need} x num_clients={K} needs {K * need} samples but the "
            f"training pool has {N}; lower min_client_size or num_clients"
        )
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(pool.labels == c) for c in range(pool.num_classes)]
    for _ in range(MAX_ATTEMPTS):
        parts: list[list[np.ndarray]] = [[] for _ in range(K)]
        lens = np.zeros(K, dtype=np.int64)
        for idx in by_class:
            idx = idx.copy()
            rng.shuffle(idx)
            for j, piece in enumerate(_dirichlet_split(idx, rng, cfg.dirichlet_alpha, lens, N / K)):
                parts[j].append(piece)
                lens[j] += len(piece)
        if lens.min() >= need:
            return _only_train(np.concatenate(p) for p in parts)
    raise UserError(
        f"partition.scheme='dirichlet' found no split with every client >= min_client_size={need} "
        f"in {MAX_ATTEMPTS} draws (num_clients={K}, dirichlet_alpha={cfg.dirichlet_alpha}, "
        f"pool of {N}); lower min_client_size or num_clients, or raise dirichlet_alpha"
    )


@register_partitioner("clip2fl_reference")
def clip2fl_reference(pool: Pool, cfg: PartitionConfig, seed: int, test_domain=None) -> Partition:
    """The CLIP2FL / CReFF partition (`clients_indices`), call for call (spec clip2fl 3.2).

    The pool must be class-major (as `longtail_select` returns it); then every client's label
    histogram equals the reference code's for the same class counts and seed. Steps: the
    Dirichlet split over auxiliary workers (`clip2fl_workers`), then `partition_balance`.
    """
    if cfg.num_clients < 10:
        raise UserError(
            f"partition.num_clients={cfg.num_clients}: clip2fl_reference needs at least 10 clients (it splits "
            "the data over groups of 10 auxiliary workers); use partition.scheme=dirichlet for fewer"
        )
    rs = np.random.RandomState(seed)
    workers = clip2fl_workers(pool.labels, pool.num_classes, cfg.num_clients, cfg.dirichlet_alpha, rs)
    return _only_train(partition_balance(np.concatenate(workers), cfg.num_clients))


def clip2fl_workers(labels: np.ndarray, num_classes: int, num_workers: int, alpha: float,
                    rs: np.random.RandomState) -> list[np.ndarray]:
    """Reference `build_non_iid_by_dirichlet`: positions 0..N-1 of `labels` dealt to workers.

    rs shuffles the positions (legacy shuffle), which are cut into chunks of int(10 / K * N)
    for groups of 10 workers (the last chunk takes the rest and K - 10 * (chunks - 1) workers).
    Per chunk (S items, w workers), until the smallest worker holds int(0.5 * S / w): for every
    class c = 0..C-1, absent ones included, a Dirichlet(alpha) draw from rs, the balance trick
    (len < S / w) and a cut of the chunk's class-c items. Workers are returned in order, each
    grouped by class.
    """
    N, K = len(labels), num_workers
    # Shuffling positions draws the same swaps as the reference's shuffle of (index, label) pairs.
    items = np.arange(N, dtype=np.int64)
    rs.shuffle(items)
    n_chunks = math.ceil(K / 10)
    step = int(10 / K * N)
    workers: list[np.ndarray] = []
    for i in range(n_chunks):
        chunk = items[i * step : (N if i == n_chunks - 1 else (i + 1) * step)]
        w = 10 if i < n_chunks - 1 else K - 10 * (n_chunks - 1)
        S, chunk_labels = len(chunk), labels[chunk]
        min_size, attempts = 0, 0
        while min_size < int(0.5 * S / w):
            if attempts == MAX_ATTEMPTS:
                raise UserError(
                    f"partition.scheme='clip2fl_reference' found no split of chunk {i} ({S} samples, "
                    f"{w} workers) with every worker >= {int(0.5 * S / w)} in {MAX_ATTEMPTS} draws "
                    f"(dirichlet_alpha={alpha}); raise dirichlet_alpha"
                )
            attempts += 1
            parts: list[list[np.ndarray]] = [[] for _ in range(w)]
            lens = np.zeros(w, dtype=np.int64)
            for c in range(num_classes):
                for j, piece in enumerate(_dirichlet_split(chunk[chunk_labels == c], rs, alpha, lens, S / w)):
                    parts[j].append(piece)
                    lens[j] += len(piece)
                min_size = lens.min()
        workers += [np.concatenate(p) for p in parts]
    return workers


def partition_balance(items: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """Reference `partition_balance`: contiguous parts of N // K, the first N mod K one longer."""
    q, r = divmod(len(items), num_clients)
    bounds = np.cumsum([0] + [q + 1 if k < r else q for k in range(num_clients)])
    return [items[bounds[k] : bounds[k + 1]] for k in range(num_clients)]


@register_partitioner("per_domain", by_domain=True)
def per_domain(pool: Pool, cfg: PartitionConfig, seed: int, test_domain: str | list[str] | None = None) -> Partition:
    """One client per participating domain, in domain order (FedCLIP, spec fedclip 3).

    `test_domain` (a name or a list, the reference's `test_envs`) is held out whole as the global
    test set, in domain order (None: every domain participates).
    A participating domain of l samples in source (ImageFolder) order is permuted by a fresh
    np.random.RandomState(seed).permutation(l); train = the first int(f0 * l), val = the next
    int(f1 * l), test = the next int(f2 * l), (f0, f1, f2) = split_fractions (0.6/0.2/0.2);
    the 0-2 leftover samples are unused.
    """
    names = pool.domain_names
    if not names:
        raise UserError(
            "partition.scheme='per_domain' needs a dataset with domains "
            "(data.dataset=imagefolder_domains); this one has none"
        )
    held = [] if test_domain is None else [test_domain] if isinstance(test_domain, str) else list(test_domain)
    for name in held:
        if name not in names:
            raise UserError(
                f"data.test_domain={name!r} is not a domain of this dataset; choose one of: {', '.join(names)}"
            )
    held_out = [names.index(name) for name in held]
    participating = [d for d in range(len(names)) if d not in held_out]
    if not participating:
        raise UserError(
            f"data.test_domain={held} holds out every domain of this dataset, leaving none to train on; "
            f"keep at least one of {', '.join(names)} out of the list"
        )
    if cfg.num_clients != len(participating):
        raise UserError(
            f"partition.num_clients={cfg.num_clients} but per_domain makes one client per participating "
            f"domain ({', '.join(names[d] for d in participating)}); set partition.num_clients={len(participating)}"
        )
    f0, f1, f2 = cfg.split_fractions
    clients = []
    for d in participating:
        pos = np.flatnonzero(pool.domains == d).astype(np.int64)
        n = len(pos)
        perm = np.random.RandomState(seed).permutation(n)
        a, b, c = int(f0 * n), int(f1 * n), int(f2 * n)
        clients.append({"train": pos[perm[:a]], "val": pos[perm[a : a + b]], "test": pos[perm[a + b : a + b + c]]})
    return Partition(clients, np.flatnonzero(np.isin(pool.domains, held_out)).astype(np.int64))
