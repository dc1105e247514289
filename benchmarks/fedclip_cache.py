"""FedCLIP local training with and without the frozen-CLIP feature cache (spec fedclip §10).

The same rounds (3 clients = domains, reference hyperparameters, batch 32, one epoch) on the same
generated domain folders, once on cached embeddings and once running the image encoder every step
as the reference does; plus the one-off cache build. ViT-B-32 untrained (timing only; offline).

    python benchmarks/fedclip_cache.py [--model ViT-B-32] [--per-class 20] [--rounds 2]
Prints a table and writes benchmarks/results/fedclip_cache.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fedclip_helpers import domain_config, make_domain_folders  # noqa: E402

from fedplatform.algorithms import ClientData, Context, get_algorithm  # noqa: E402
from fedplatform.data import prepare  # noqa: E402
from fedplatform.models.feature_cache import build_feature_cache, cache_path  # noqa: E402


def timed_rounds(cfg, ds, rounds):
    ctx = Context(cfg=cfg, num_classes=ds.num_classes, class_names=ds.class_names, image_shape=ds.image_shape,
                  norm_mean=ds.norm_mean, norm_std=ds.norm_std, train_class_counts=ds.train_class_counts,
                  device=torch.device("cpu"), dataset=ds)
    algo = get_algorithm("fedclip")(ctx)
    algo.load_clip()  # CLIP load and text prototypes are per-actor one-offs, not per round
    state = algo.init_server_state(cfg.seed)
    times = []
    for r in range(rounds):
        t0 = time.perf_counter()
        updates = []
        for c in ds.client_ids:
            ids = ds.client_samples(c)
            data = ClientData(c, None, torch.from_numpy(np.asarray(ds.labels[ids])), ids)
            updates.append(algo.client_update(state, data, torch.Generator().manual_seed(100 * r + c)))
        state = algo.aggregate(state, updates, r)
        times.append(time.perf_counter() - t0)
    return times, state


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--per-class", type=int, default=20, help="images per class per domain (3 classes, 4 domains)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedclip-bench-"))
    os.environ.setdefault("FEDPLATFORM_CACHE", str(work / "cache"))
    root = make_domain_folders(work / "domains", per_class=args.per_class, size=96)
    cfg = domain_config(root, batch_size=32)
    cfg.clip.model = args.model
    ds = prepare(cfg)
    n_train = sum(len(ds.client_samples(c)) for c in ds.client_ids)

    t0 = time.perf_counter()
    build_feature_cache(cfg, ds, use_ray=False)
    build_s = time.perf_counter() - t0
    cached, s_cached = timed_rounds(cfg, ds, args.rounds)
    uncached_cfg = cfg.model_copy(deep=True)
    uncached_cfg.algorithm.use_feature_cache = False
    uncached, s_uncached = timed_rounds(uncached_cfg, ds, args.rounds)
    diff = max(float((s_cached[k] - s_uncached[k]).abs().max()) for k in s_cached)

    res = {
        "model": args.model, "pretrained": None, "images": len(ds), "train_images_per_round": n_train,
        "clients": len(ds.client_ids), "rounds": args.rounds, "batch_size": 32,
        "cache_build_s": build_s, "cache_bytes": (cache_path(cfg, ds) / "features.arrow").stat().st_size,
        "round_s_cached": float(np.mean(cached)), "round_s_uncached": float(np.mean(uncached)),
        "speedup": float(np.mean(uncached) / np.mean(cached)), "max_abs_weight_diff": diff,
        "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "cuda": torch.cuda.is_available(),
    }
    print(f"FedCLIP local training, {args.model} (untrained), {len(ds)} images, {n_train} train images/round, "
          f"{len(ds.client_ids)} clients, {torch.get_num_threads()} torch threads, CPU")
    print(f"{'':28}{'s / round':>12}")
    print(f"{'encoder every step (ref.)':28}{res['round_s_uncached']:>12.3f}")
    print(f"{'feature cache':28}{res['round_s_cached']:>12.4f}")
    print(f"{'speed-up':28}{res['speedup']:>11.1f}x")
    print(f"{'one-off cache build':28}{build_s:>12.2f}  ({res['cache_bytes'] / 1e6:.2f} MB)")
    print(f"{'max |adapter diff|':28}{diff:>12.2e}")
    out = Path(__file__).parent / "results" / "fedclip_cache.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
