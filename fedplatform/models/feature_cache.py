"""Frozen-CLIP image embeddings of every sample of a prepared dataset, computed once.

v = float(encode_image(preprocess(x))) (the projected global embedding; CLIP's eval preprocessing,
no augmentation) for every sample id of a `FederatedDataset`. CLIP is frozen and deterministic,
so training on these rows equals re-running the encoder every step as the FedCLIP reference does
(spec fedclip §10).

Layout: `<dataset cache dir>/clip-features/<dataset>-<model>-<key[:16]>/`
- features.arrow  Arrow IPC file, uncompressed, one record batch: `embedding`
                  FixedSizeList<float32>[d], row = sample id (memory-mapped zero-copy as [N, d]).
- meta.json       written last: the key and its recipe (dataset fingerprint, model, weights
                  identity, preprocessing, precision), shape, the file's byte size and sha256.

The key is a sha256 over that recipe, so a cache is shared by every run and sweep trial on the
same data and weights. A cache is written into a temporary directory and renamed into place; a
partial or corrupted one (missing meta, wrong size or checksum) is removed and rebuilt.
Built in parallel by a pool of Ray actors (GPU fractions when the cluster has GPUs), which read the
store through the same fetch path as client actors (runtime/replicate.py): once per node.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import torch
from PIL import Image, ImageFile

from fedplatform.config import ExperimentConfig
from fedplatform.data.store import atomic_directory, sha256_file
from fedplatform.errors import UserError
from fedplatform.models.clip import create_clip, embed_dim, weights_identity

log = logging.getLogger(__name__)

# The reference sets this globally (truncated PACS/Office-Home files decode instead of raising).
ImageFile.LOAD_TRUNCATED_IMAGES = True

CACHE_VERSION = 1
FEATURES, META = "features.arrow", "meta.json"
DEFAULT_BATCH_SIZE = 256
DEFAULT_PRECISION = "fp32"
PREPROCESSING = "open_clip eval transform (resize shortest side, center crop, RGB, normalise); gray->RGB"


class FeatureCacheError(UserError):
    """A feature cache that is missing, partial or corrupted."""


# ---------------------------------------------------------------------------- images


def pixel_images(pixels: np.ndarray) -> list[Image.Image]:
    """RGB PIL images of uint8 pixels [n, H, W, 1 or 3] (gray -> RGB)."""
    if pixels.shape[-1] == 1:
        return [Image.fromarray(p[..., 0], "L").convert("RGB") for p in pixels]
    return [Image.fromarray(p).convert("RGB") for p in pixels]


def pil_images(dataset, ids: np.ndarray) -> list[Image.Image]:
    """RGB PIL images of the given samples: fixed-size stores from pixels (gray -> RGB), encoded
    stores by decoding the file bytes (truncated files tolerated)."""
    ids = np.asarray(ids, dtype=np.int64)
    if dataset.image_shape is not None:
        return pixel_images(dataset.pixels(ids))
    return [Image.open(io.BytesIO(b)).convert("RGB") for b in dataset.encoded(ids)]


def preprocess_images(dataset, ids: np.ndarray, preprocess, map_fn=map) -> torch.Tensor:
    """[n, 3, S, S] float32 CLIP inputs of the given samples (`map_fn`: e.g. a thread pool's map)."""
    images = pil_images(dataset, ids)
    if not images:
        return torch.zeros(0)
    return torch.stack(list(map_fn(preprocess, images)))


@torch.no_grad()
def encode_samples(clip, preprocess, dataset, ids: np.ndarray, batch_size: int = DEFAULT_BATCH_SIZE,
                   threads: int | None = None) -> np.ndarray:
    """float32 [n, d] = float(encode_image(preprocess(x))) of the given samples, in batches.
    Preprocessing (PIL's resize: the costly part beside a GPU) runs on `threads` threads (default
    `torch.get_num_threads()`; PIL and torch release the GIL) while the device encodes the previous
    batch; the result is the same as one image at a time. threads=1: all in this thread."""
    param = next(clip.parameters())
    threads = threads or torch.get_num_threads()
    out, pending = [], None
    with ThreadPoolExecutor(threads) if threads > 1 else nullcontext() as pool:
        for start in range(0, len(ids), batch_size):
            x = preprocess_images(dataset, ids[start : start + batch_size], preprocess, pool.map if pool else map)
            if pending is not None:
                out.append(pending.float().cpu().numpy())
            pending = clip.encode_image(x.to(param.device, param.dtype))
    if pending is not None:
        out.append(pending.float().cpu().numpy())
    if not out:
        return np.zeros((0, getattr(clip.visual, "output_dim", 0)), np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)


# ---------------------------------------------------------------------------- key and paths


def _require_clip(cfg: ExperimentConfig) -> str:
    if not cfg.clip.model:
        raise UserError("clip.model is not set; the feature cache needs a CLIP model (e.g. clip.model=ViT-B-32)")
    return cfg.clip.model


def cache_recipe(cfg: ExperimentConfig, dataset, precision: str = DEFAULT_PRECISION) -> dict:
    model = _require_clip(cfg)
    return {
        "cache_version": CACHE_VERSION,
        "dataset_fingerprint": dataset.fingerprint,
        "model": model,
        "weights": weights_identity(model, cfg.clip.pretrained),
        "preprocessing": {"recipe": PREPROCESSING, "open_clip": open_clip.__version__,
                          "model_config": open_clip.get_model_config(model).get("vision_cfg")},
        "precision": precision,
    }


def cache_key(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def cache_path(cfg: ExperimentConfig, dataset, precision: str = DEFAULT_PRECISION) -> Path:
    key = cache_key(cache_recipe(cfg, dataset, precision))
    return Path(dataset.path).parent / "clip-features" / f"{dataset.dataset}-{_require_clip(cfg)}-{key[:16]}"


def _check(path: Path, key: str, verify: bool) -> dict:
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as exc:
        raise FeatureCacheError(f"feature cache {path} is incomplete or corrupted (meta.json: {exc})") from None
    if meta.get("key") != key:
        raise FeatureCacheError(f"feature cache {path} has key {str(meta.get('key'))[:16]}..., expected {key[:16]}...")
    file = path / FEATURES
    size = file.stat().st_size if file.is_file() else None
    if size != meta["bytes"]:
        raise FeatureCacheError(f"feature cache {path} is corrupted: {FEATURES} has {size} bytes, expected {meta['bytes']}")
    if verify and sha256_file(file) != meta["sha256"]:
        raise FeatureCacheError(f"feature cache {path} is corrupted: {FEATURES} does not match its sha256")
    return meta


# ---------------------------------------------------------------------------- public API


def build_feature_cache(cfg: ExperimentConfig, dataset, batch_size: int = DEFAULT_BATCH_SIZE,
                        precision: str = DEFAULT_PRECISION, use_ray: bool = True,
                        num_workers: int | None = None) -> Path:
    """The verified feature cache of (dataset, cfg.clip) at `precision`, built when missing or
    corrupted (idempotent). use_ray=False encodes in this process (tests, small data)."""
    recipe = cache_recipe(cfg, dataset, precision)
    key = cache_key(recipe)
    path = cache_path(cfg, dataset, precision)
    if path.exists():
        try:
            _check(path, key, verify=True)
            log.info("using CLIP feature cache %s", path)
            return path
        except FeatureCacheError as exc:
            log.warning("%s; removing it and rebuilding", exc)
            shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ids = np.arange(len(dataset), dtype=np.int64)
    if use_ray:
        feats = _encode_on_ray(cfg, dataset, ids, batch_size, precision, num_workers)
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        clip, preprocess, _, _ = create_clip(cfg.clip.model, cfg.clip.pretrained, device, precision)
        feats = encode_samples(clip, preprocess, dataset, ids, batch_size)
    _write(path, feats, recipe, key)
    log.info("built CLIP feature cache %s (%d x %d) in %.1f s", path, *feats.shape, time.perf_counter() - t0)
    return path


def load_feature_cache(cfg: ExperimentConfig, dataset, precision: str = DEFAULT_PRECISION,
                       verify: bool = False) -> np.ndarray:
    """Read-only float32 [N, d] view (memory-mapped), row = sample id. Sizes are always checked,
    the sha256 when `verify`; a missing or bad cache raises FeatureCacheError (build it with
    `build_feature_cache` or `fedplatform cache build`)."""
    recipe = cache_recipe(cfg, dataset, precision)
    path = cache_path(cfg, dataset, precision)
    if not path.exists():
        raise FeatureCacheError(f"no CLIP feature cache at {path}; build it with `fedplatform cache build PIPELINE`")
    meta = _check(path, cache_key(recipe), verify)
    table = pa.ipc.open_file(pa.memory_map(str(path / FEATURES))).read_all()
    chunk = table.column("embedding").chunks[0]
    values = chunk.flatten()
    flat = np.frombuffer(values.buffers()[1], dtype=np.float32, count=len(values), offset=values.offset * 4)
    feats = flat.reshape(meta["shape"])
    if feats.shape[0] != len(dataset):
        raise FeatureCacheError(f"feature cache {path} has {feats.shape[0]} rows, the dataset {len(dataset)}")
    return feats


def _write(path: Path, feats: np.ndarray, recipe: dict, key: str) -> None:
    with atomic_directory(path, META) as tmp:
        n, d = feats.shape
        arr = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(feats, np.float32).reshape(-1)), d)
        schema = pa.schema([("embedding", pa.list_(pa.float32(), d))])
        with pa.OSFile(str(tmp / FEATURES), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            writer.write_batch(pa.record_batch([arr], schema=schema))
        meta = {"key": key, "recipe": recipe, "shape": [n, d], "bytes": (tmp / FEATURES).stat().st_size,
                "sha256": sha256_file(tmp / FEATURES), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp / META).write_text(json.dumps(meta, indent=1))  # last: its presence marks completeness


# ---------------------------------------------------------------------------- Ray pool


def _pool_shape(n_chunks: int, num_workers: int | None, wait_s: float) -> tuple[int, float, float]:
    """(actors, CPUs each, GPUs each): half a GPU each where the cluster has GPUs (an autoscaling
    cluster whose node types have GPUs is asked for them first), else the free CPUs, at most one
    node's CPUs per actor (a larger request would never be placed)."""
    from fedplatform.runtime.resources import Cluster, release_request, wait_for_resources

    cluster = Cluster.observe()
    gpus = cluster.available.get("GPU", 0.0)
    if gpus <= 0 and cluster.autoscaling and cluster.most.get("GPU", 0.0) > 0:
        n = max(1, min(num_workers or 2, n_chunks))
        if wait_for_resources([{"CPU": 1.0, "GPU": 0.5}] * n, cluster, wait_s, f"{n} CLIP encoders"):
            release_request()
        return n, 1.0, 0.5
    if gpus > 0:
        per_gpu = min(0.5, gpus)
        n = num_workers or max(1, int(gpus / per_gpu))
        return max(1, min(n, n_chunks)), 1.0, per_gpu
    cpus = max(1.0, cluster.available.get("CPU", 1.0))
    largest = max([n.get("CPU", 0.0) for n in cluster.nodes] + [1.0])
    n = max(1, min(num_workers or max(1, int(cpus) // 2), n_chunks))
    return n, float(max(1, min(int(cpus) // n, int(largest)))), 0.0


def _encode_on_ray(cfg, dataset, ids, batch_size, precision, num_workers) -> np.ndarray:
    import ray
    from ray.util import ActorPool

    from fedplatform.experiment import ensure_ray
    from fedplatform.runtime.replicate import PreparedData, publish_location

    ensure_ray()
    # Encoders read the store through the actors' fetch path: a node without it fetches it once.
    data = PreparedData.serve(dataset.path, publish_to=publish_location(cfg))
    chunk = batch_size * 4
    starts = list(range(0, len(ids), chunk))
    n, cpus, gpus = _pool_shape(len(starts), num_workers, cfg.runtime.wait_for_resources_s)
    log.info("encoding %d images with %d CLIP actor(s) (%g CPU, %g GPU each)", len(ids), n, cpus, gpus)
    actors = [_Encoder.options(num_cpus=cpus, num_gpus=gpus).remote(
        cfg.clip.model, cfg.clip.pretrained, data, int(cpus), gpus > 0, precision, batch_size)
        for _ in range(n)]
    try:
        pool = ActorPool(actors)
        parts = dict(pool.map_unordered(lambda a, s: a.encode.remote(s, ids[s : s + chunk]), starts))
    finally:
        data.stop_file_server()
        for a in actors:
            ray.kill(a)
    return np.concatenate([parts[s] for s in starts]) if starts else np.zeros((0, embed_dim(cfg.clip.model)), np.float32)


def _make_encoder():
    import ray

    @ray.remote
    class Encoder:
        def __init__(self, model, pretrained, data, threads, use_gpu, precision, batch_size):
            torch.set_num_threads(max(1, threads))
            device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
            self.clip, self.preprocess, _, _ = create_clip(model, pretrained, device, precision)
            self.ds = data.open_here()  # fetched first on a node that lacks it
            self.batch_size = batch_size

        def encode(self, start: int, ids: np.ndarray) -> tuple[int, np.ndarray]:
            return start, encode_samples(self.clip, self.preprocess, self.ds, ids, self.batch_size)

    return Encoder


class _LazyEncoder:
    """Defers `ray.remote` to first use (importing this module must not need Ray)."""

    _cls = None

    def options(self, **kw):
        if _LazyEncoder._cls is None:
            _LazyEncoder._cls = _make_encoder()
        return _LazyEncoder._cls.options(**kw)


_Encoder = _LazyEncoder()
