"""The prepared federated dataset: Arrow files written once, memory-mapped by every actor.

`prepare(cfg)` returns the store for a config, building it on the first call. A store lives in
`<cache_dir>/<dataset>-<fingerprint[:16]>/`, the fingerprint being a sha256 over the format
version, the source identity (paths and stat data), the data fields that change the samples,
the partition section and the seed. Files:

- samples.arrow   Arrow IPC file, uncompressed (memory-maps zero-copy): id int64 (= row),
                  label int64, domain int16, and either pixels FixedSizeList<uint8>[H*W*C]
                  (small fixed-size images, one record batch) or image binary (encoded file
                  bytes, streamed in record batches). Only used samples: train pool + test.
- manifest.arrow  client_id int32 (-1 = global test set), split string, sample_id int64.
- meta.json       written last: fingerprint, names, shapes, normalisation, the config pieces
                  used, and each file's byte size and sha256.

A store is written into a temporary directory next to its final place and renamed into place
when complete, so readers never see a partial store. `prepare` verifies sizes and checksums;
a truncated or corrupted store is removed and rebuilt with a warning, never used.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from fedplatform.config import ExperimentConfig
from fedplatform.data.longtail import longtail_select
from fedplatform.data.partition import Pool, get_partitioner, partition
from fedplatform.data.sources import Source, SplitData, open_source
from fedplatform.errors import UserError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SAMPLES, MANIFEST, META = "samples.arrow", "manifest.arrow", "meta.json"
GLOBAL_TEST = -1
SPLITS = ("train", "val", "test")
ENCODED_BATCH_BYTES = 64 << 20
"""Encoded images are read and written in record batches of about this size."""


class StoreError(UserError):
    """A prepared store that is missing, truncated or corrupted."""


def cache_dir(cfg: ExperimentConfig) -> Path:
    """data.cache_dir, else $FEDPLATFORM_CACHE, else ~/.cache/fedplatform."""
    raw = cfg.data.cache_dir or os.environ.get("FEDPLATFORM_CACHE") or "~/.cache/fedplatform"
    return Path(raw).expanduser().resolve()


def fingerprint(cfg: ExperimentConfig, source: Source) -> str:
    """sha256 of the canonical JSON of everything that determines the store's content."""
    return hashlib.sha256(_canonical(_recipe(cfg, source)).encode()).hexdigest()


def _recipe(cfg: ExperimentConfig, source: Source) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "source": {"name": source.name, "identity": source.identity()},
        "data": {k: getattr(cfg.data, k) for k in ("imbalance_factor", "test_fraction", "test_domain")},
        "partition": cfg.partition.model_dump(mode="json"),
        "seed": cfg.seed,
        # only when set, so stores prepared before the key existed keep their fingerprint
        **({"longtail_seed": cfg.data.longtail_seed} if cfg.data.longtail_seed is not None else {}),
    }


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def prepare(cfg: ExperimentConfig, rebuild: bool = False) -> FederatedDataset:
    """The federated dataset of `cfg`: opened from the cache when a verified store exists,
    otherwise built (source -> test split -> long tail -> partition) and written."""
    spec = get_partitioner(cfg.partition.scheme)  # an unknown scheme fails before any loading
    if spec.by_domain and cfg.data.imbalance_factor != 1:
        raise UserError(
            f"data.imbalance_factor={cfg.data.imbalance_factor} cannot be combined with "
            f"partition.scheme={cfg.partition.scheme!r}, which splits every domain as it is; use 1"
        )
    source = open_source(cfg.data)
    fp = fingerprint(cfg, source)
    root = cache_dir(cfg)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"cannot create the data cache {root} ({exc.strerror}); set data.cache_dir or $FEDPLATFORM_CACHE"
        ) from None
    path = root / f"{cfg.data.dataset}-{fp[:16]}"
    if path.exists():
        if rebuild:
            shutil.rmtree(path)
        else:
            try:
                ds = open_store(path, verify=True)
                if ds.fingerprint != fp:
                    raise StoreError(f"{path}: fingerprint {ds.fingerprint[:16]}... does not match {fp[:16]}...")
                log.info("using prepared data %s", path)
                return ds
            except StoreError as exc:
                log.warning("%s; removing it and rebuilding", exc)
                shutil.rmtree(path, ignore_errors=True)
    return _build(cfg, source, fp, path)


def _build(cfg: ExperimentConfig, source: Source, fp: str, path: Path) -> FederatedDataset:
    t0 = time.perf_counter()
    log.info("preparing %s into %s", cfg.data.dataset, path)
    data = source.load()
    num_classes = len(data.class_names)
    by_domain = get_partitioner(cfg.partition.scheme).by_domain
    train, test = data.train, data.test
    if by_domain:
        pool = train  # source order; the partitioner holds out a domain as the test set
    else:
        if test is None:  # hold out a stratified test set before the long tail is applied
            train_idx, test_idx = _stratified_split(train.labels, cfg.data.test_fraction, cfg.seed)
            train, test = train.take(train_idx), train.take(test_idx)
        pool = train.take(longtail_select(train.labels, cfg.data.imbalance_factor, longtail_seed(cfg), num_classes))
    part = partition(Pool(pool.labels, num_classes, pool.domains, data.domain_names), cfg.partition, cfg.seed,
                     cfg.data.test_domain)

    # Sample ids: pool positions 0..P-1, then the source's test split P..P+T-1.
    samples = pool if test is None else _concat(pool, test)
    rows = [(cid, split, ids) for cid, splits in enumerate(part.clients) for split, ids in splits.items()]
    global_test = part.global_test
    if test is not None:
        global_test = np.concatenate([global_test, len(pool) + np.arange(len(test), dtype=np.int64)])
    rows.append((GLOBAL_TEST, "test", global_test))

    _cleanup_stale(path)
    with atomic_directory(path, META) as tmp:
        image_shape = _write_samples(tmp / SAMPLES, samples)
        _write_manifest(tmp / MANIFEST, rows)
        meta = {
            "format_version": FORMAT_VERSION,
            "fingerprint": fp,
            "dataset": cfg.data.dataset,
            "class_names": data.class_names,
            "domain_names": data.domain_names,
            "image_shape": image_shape,
            "norm_mean": list(data.norm_mean),
            "norm_std": list(data.norm_std),
            "num_clients": len(part.clients),
            "num_samples": len(samples),
            "files": {name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
                      for name in (SAMPLES, MANIFEST)},
            "recipe": _recipe(cfg, source),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / META).write_text(json.dumps(meta, indent=1))  # last: its presence marks completeness
    log.info("prepared %d samples for %d clients in %.1f s", len(samples), len(part.clients), time.perf_counter() - t0)
    return open_store(path, verify=False)


def longtail_seed(cfg: ExperimentConfig) -> int:
    """Seed of the long-tail selection: data.longtail_seed, else the run seed."""
    return cfg.seed if cfg.data.longtail_seed is None else cfg.data.longtail_seed


def _stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split (scikit-learn train_test_split), both parts in ascending order."""
    from sklearn.model_selection import train_test_split

    try:
        tr, te = train_test_split(np.arange(len(labels)), test_size=fraction, stratify=labels, random_state=seed)
    except ValueError as exc:
        raise UserError(f"data.test_fraction={fraction} cannot give a stratified test split: {exc}") from None
    return np.sort(tr), np.sort(te)


def _concat(a: SplitData, b: SplitData) -> SplitData:
    return SplitData(
        np.concatenate([a.labels, b.labels]),
        np.concatenate([a.domains, b.domains]),
        np.concatenate([a.pixels, b.pixels]) if a.pixels is not None else None,
        a.paths + b.paths if a.paths is not None else None,
    )


def _cleanup_stale(path: Path, max_age_s: float = 86400.0) -> None:
    """Remove temporary directories of this store left by killed processes (older than a day)."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        try:
            if time.time() - tmp.stat().st_mtime > max_age_s:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


@contextmanager
def atomic_directory(path: Path, meta_name: str) -> Iterator[Path]:
    """A temporary directory beside `path`, renamed to `path` when the block completes (the block
    writes `meta_name` last: its presence marks a complete directory). If another process renamed
    an identical one into place first, theirs is kept; on any error nothing is left behind."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700: caches are shared by Ray workers and users
    try:
        yield tmp
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / meta_name).is_file():
                raise
            log.info("another process wrote %s first; using it", path)  # same key, same content
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_samples(file: Path, s: SplitData) -> list[int] | None:
    n = len(s)
    base = [pa.array(np.arange(n, dtype=np.int64)), pa.array(s.labels.astype(np.int64)),
            pa.array(s.domains.astype(np.int16))]
    if s.pixels is not None:
        shape = list(s.pixels.shape[1:])
        width = int(np.prod(shape))
        schema = pa.schema([("id", pa.int64()), ("label", pa.int64()), ("domain", pa.int16()),
                            ("pixels", pa.list_(pa.uint8(), width))])
        pixels = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(s.pixels).reshape(-1)), width)
        with pa.OSFile(str(file), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            # One record batch: every column maps to one contiguous buffer (zero-copy numpy views).
            writer.write_batch(pa.record_batch(base + [pixels], schema=schema))
        return shape
    schema = pa.schema([("id", pa.int64()), ("label", pa.int64()), ("domain", pa.int16()), ("image", pa.binary())])
    with pa.OSFile(str(file), "wb") as sink, pa.ipc.new_file(sink, schema) as writer, \
            ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        start = 0
        while start < n:
            # Size batches from file sizes so that large images never pile up in memory.
            stop, size = start, 0
            while stop < n and (stop == start or size < ENCODED_BATCH_BYTES):
                size += _file_size(s.paths[stop])
                stop += 1
            images = pa.array(list(pool.map(_read_bytes, s.paths[start:stop])), type=pa.binary())
            writer.write_batch(pa.record_batch([c.slice(start, stop - start) for c in base] + [images], schema=schema))
            start = stop
    return None


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError as exc:
        raise UserError(f"cannot read image {path}: {exc.strerror}") from None


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise UserError(f"cannot read image {path}: {exc.strerror}") from None


def _write_manifest(file: Path, rows: list[tuple[int, str, np.ndarray]]) -> None:
    cids = np.concatenate([np.full(len(ids), cid, np.int32) for cid, _, ids in rows])
    splits = [split for _, split, ids in rows for _ in range(len(ids))]
    sids = np.concatenate([np.asarray(ids, np.int64) for _, _, ids in rows])
    table = pa.table({"client_id": cids, "split": pa.array(splits, pa.string()), "sample_id": sids})
    with pa.OSFile(str(file), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


# ---------------------------------------------------------------------------- reading


def open_store(path: str | Path, verify: bool = True) -> FederatedDataset:
    """Open a prepared store. Always checks that meta.json and every file exist with the
    recorded sizes; `verify` also checks the sha256 of every file (the driver does; actors
    opening a store the driver verified pass verify=False)."""
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"prepared data at {path} is incomplete or corrupted (meta.json: {exc})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"prepared data at {path} has format {meta.get('format_version')}, expected {FORMAT_VERSION}")
    for name, info in meta["files"].items():
        file = path / name
        size = file.stat().st_size if file.is_file() else None
        if size != info["bytes"]:
            raise StoreError(f"prepared data at {path} is corrupted: {name} has {size} bytes, expected {info['bytes']}")
        if verify and sha256_file(file) != info["sha256"]:
            raise StoreError(f"prepared data at {path} is corrupted: {name} does not match its sha256")
    try:
        return FederatedDataset(path, meta)
    except (pa.ArrowException, KeyError, ValueError) as exc:
        raise StoreError(f"prepared data at {path} is corrupted: {exc}") from None


def _mapped_table(file: Path) -> pa.Table:
    return pa.ipc.open_file(pa.memory_map(str(file))).read_all()  # buffers point into the map


def _view(arr: pa.Array, dtype) -> np.ndarray:
    """Zero-copy numpy view of a null-free primitive Arrow array (Array.to_numpy would import
    pandas, a quarter second on every open)."""
    dtype = np.dtype(dtype)
    return np.frombuffer(arr.buffers()[1], dtype=dtype, count=len(arr), offset=arr.offset * dtype.itemsize)


def _column(table: pa.Table, name: str, dtype) -> np.ndarray:
    chunks = table.column(name).chunks
    if len(chunks) == 1:
        return _view(chunks[0], dtype)  # a view of the mapped buffer
    # Encoded-image stores are streamed in several record batches: one small copy.
    return np.concatenate([_view(c, dtype) for c in chunks]) if chunks else np.zeros(0, dtype)


class FederatedDataset:
    """A prepared store: samples (memory-mapped), the client manifest and metadata.

    Opening is cheap (no full-table copies): labels, domains and pixels are views of the mapped
    file; the per-client index is built once from the small manifest.
    """

    def __init__(self, path: Path, meta: dict):
        self.path = Path(path)
        self.meta = meta
        self.fingerprint: str = meta["fingerprint"]
        self.dataset: str = meta["dataset"]
        self.class_names: list[str] = meta["class_names"]
        self.domain_names: list[str] = meta["domain_names"]
        self.num_classes = len(self.class_names)
        self.image_shape: tuple[int, int, int] | None = tuple(meta["image_shape"]) if meta["image_shape"] else None
        self.norm_mean: tuple[float, ...] = tuple(meta["norm_mean"])
        self.norm_std: tuple[float, ...] = tuple(meta["norm_std"])

        self._samples = _mapped_table(self.path / SAMPLES)
        if self._samples.num_rows != meta["num_samples"]:
            raise ValueError(f"{SAMPLES} has {self._samples.num_rows} rows, meta.json says {meta['num_samples']}")
        self.labels: np.ndarray = _column(self._samples, "label", np.int64)
        self.domains: np.ndarray = _column(self._samples, "domain", np.int16)
        self._pixels = None
        if self.image_shape is not None:
            chunks = self._samples.column("pixels").chunks  # one record batch: a view of the map
            flat = [_view(c.flatten(), np.uint8) for c in chunks]
            self._pixels = (flat[0] if len(flat) == 1 else np.concatenate(flat)).reshape(-1, *self.image_shape)

        manifest = _mapped_table(self.path / MANIFEST)
        cid = _column(manifest, "client_id", np.int32)
        split = manifest.column("split").combine_chunks().dictionary_encode()
        names = split.dictionary.to_pylist()
        code = _view(split.indices, np.int32)
        sid = _column(manifest, "sample_id", np.int64)
        key = (cid.astype(np.int64) + 1) * len(names) + code  # group by (client, split), keeping row order
        order = np.argsort(key, kind="stable")
        keys, starts = np.unique(key[order], return_index=True)
        groups = np.split(sid[order], starts[1:])
        self._index: dict[tuple[int, str], np.ndarray] = {
            (int(k // len(names)) - 1, names[int(k % len(names))]): g for k, g in zip(keys, groups)
        }
        self._clients = {c for c, _ in self._index} | {GLOBAL_TEST}
        self.client_ids: list[int] = sorted(self._clients - {GLOBAL_TEST})
        self.test_ids: np.ndarray = self._index.get((GLOBAL_TEST, "test"), np.zeros(0, np.int64))
        train = [self.client_samples(c) for c in self.client_ids]
        self.train_class_counts: np.ndarray = np.bincount(
            self.labels[np.concatenate(train)] if train else np.zeros(0, np.int64), minlength=self.num_classes)
        self.test_class_counts: np.ndarray = np.bincount(self.labels[self.test_ids], minlength=self.num_classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return (f"FederatedDataset({self.dataset}, {len(self)} samples, {len(self.client_ids)} clients, "
                f"{len(self.test_ids)} global test, path={str(self.path)!r})")

    def client_samples(self, client_id: int, split: str = "train") -> np.ndarray:
        """Sample ids (int64) of one client's split ("train", "val" or "test")."""
        if client_id not in self._clients:
            raise KeyError(f"client {client_id} is not in this dataset (clients: {self.client_ids})")
        if split not in SPLITS:
            raise KeyError(f"split {split!r} is not one of {', '.join(SPLITS)}")
        return self._index.get((client_id, split), np.zeros(0, np.int64))

    def pixels(self, ids: np.ndarray) -> np.ndarray:
        """uint8 [n, H, W, C] copies of the given samples' pixels."""
        if self._pixels is None:
            raise ValueError(f"dataset {self.dataset} stores encoded images; use encoded(ids)")
        return self._pixels[np.asarray(ids, dtype=np.int64)]

    def encoded(self, ids: np.ndarray) -> list[bytes]:
        """Encoded image file bytes of the given samples."""
        if self._pixels is not None:
            raise ValueError(f"dataset {self.dataset} stores decoded pixels; use pixels(ids)")
        return self._samples.column("image").take(pa.array(np.asarray(ids, dtype=np.int64))).to_pylist()

    def describe(self) -> dict:
        """Dataset, classes, global class counts and every client's train label histogram."""
        clients = []
        for c in self.client_ids:
            counts = np.bincount(self.labels[self.client_samples(c)], minlength=self.num_classes)
            clients.append({"id": c, "num_samples": int(counts.sum()), "class_counts": counts.tolist()})
        return {
            "dataset": self.dataset,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "train_class_counts": self.train_class_counts.tolist(),
            "test_class_counts": self.test_class_counts.tolist(),
            "clients": clients,
        }
