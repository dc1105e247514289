"""One CLIP2FL round at the reference settings on CIFAR-10-LT (IF 100, reference partition, K = 20,
the reference round-1 sample of 8 clients, ViT-B-32 UNTRAINED: timing only): cached teacher vs the
reference per-step teacher (CLIP on the 224 bicubic view of every batch).

    tar -xf ../shared/datasets/cifar10-jpeg.tar -C /tmp
    python benchmarks/clip2fl_round.py --root /tmp/cifar10-jpeg [--local-epochs 10] [--clients 8] [--steps 5]
        [--precision fp32|bf16]

Client time: every sampled client's full `client_update` with the cached teacher (local epochs as
given). The per-step teacher is far too slow for whole clients on a CPU, so both teachers are also
timed on the same local steps (`--steps` batches of one client, local training alone, after one
warm-up step); the per-step teacher's whole-round client time is extrapolated from that per-step
overhead and stated as such. The per-step ratio of those local steps is the most any teacher cache
can gain per step. `--precision bf16` runs local training, and with it the per-step teacher, under
bf16 autocast (the cache stays fp32). Server time = FedAvg + feature matching (match_epoch 100, GML + eta·PCL) + re-training
(crt_epoch 300, 9,600 steps), each timed. The feature cache is a one-off (built before round 1):
its cost is reported per image, measured on the sampled clients' images.
Prints a table and writes benchmarks/results/clip2fl_round.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedplatform.algorithms import ClientData, Context, get_algorithm
from fedplatform.algorithms.creff import model_part
from fedplatform.algorithms.fedavg import local_sgd
from fedplatform.algorithms.images import student_images
from fedplatform.config import load_config
from fedplatform.data import prepare
from fedplatform.models.feature_cache import encode_samples

ROOT = Path(__file__).resolve().parents[1]
ROUND1 = [1, 17, 2, 5, 11, 0, 18, 6]
"""Reference client sample of round 1 (RandomState(7), K = 20, 8 per round; spec §3.2)."""


def make(cfg, ds):
    ctx = Context(cfg=cfg, num_classes=ds.num_classes, class_names=ds.class_names, image_shape=ds.image_shape,
                  norm_mean=ds.norm_mean, norm_std=ds.norm_std, train_class_counts=ds.train_class_counts,
                  device=torch.device("cpu"), dataset=ds)
    algo = get_algorithm("clip2fl")(ctx)
    algo.load_clip()  # per-actor one-off (CLIP load, text prototypes)
    return algo


def client_data(ds, cid, limit=None):
    ids = ds.client_samples(cid)
    if limit is not None:
        ids = ids[:limit]
    return ClientData(cid, torch.from_numpy(ds.pixels(ids)), torch.from_numpy(np.asarray(ds.labels[ids])), ids)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/cifar10-jpeg")
    ap.add_argument("--local-epochs", type=int, default=10)
    ap.add_argument("--clients", type=int, default=8, help="how many of the round-1 clients to run")
    ap.add_argument("--steps", type=int, default=5, help="local steps timed for the cached vs per-step comparison")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = ap.parse_args()
    os.environ.setdefault("FEDPLATFORM_CACHE", str(Path(tempfile.gettempdir()) / "fedplatform-bench-cache"))
    base = [f"data.root={args.root}", "clip.pretrained=null", f"algorithm.precision={args.precision}"]
    cfg = load_config(ROOT / "pipelines/clip2fl_cifar10_lt.yaml", base + [f"algorithm.local_epochs={args.local_epochs}"])
    ds = prepare(cfg)
    clients = ROUND1[: args.clients]
    algo = make(cfg, ds)

    # One-off cache, restricted to the sampled clients' images (the full build is the same per image).
    ids = np.concatenate([ds.client_samples(c) for c in clients])
    t0 = time.perf_counter()
    emb = encode_samples(algo.clip, algo.preprocess, ds, ids)
    encode_s = time.perf_counter() - t0
    cache = np.zeros((len(ds), emb.shape[1]), np.float32)
    cache[ids] = emb
    algo._cache = cache

    # Full round, cached teacher.
    state = algo.init_server_state(cfg.seed)
    payload = algo.broadcast(state)
    updates, client_s = [], {}
    for c in clients:
        t0 = time.perf_counter()
        updates.append(algo.client_update(payload, client_data(ds, c), torch.Generator().manual_seed(c)))
        client_s[c] = time.perf_counter() - t0
    t0 = time.perf_counter()
    algo.aggregate(state, sorted(updates, key=lambda u: u.client_id), 1)
    server_s = time.perf_counter() - t0
    timings = dict(algo.timings)

    # The same local steps of one client (one epoch over steps * batch samples), both teachers:
    # local training alone, after a one-step warm-up.
    n = args.steps * cfg.algorithm.batch_size
    step_cfg = load_config(ROOT / "pipelines/clip2fl_cifar10_lt.yaml", base + ["algorithm.local_epochs=1"])
    d = client_data(ds, clients[0], limit=n)
    step_s = {}
    for cached in (True, False):
        c2 = step_cfg.model_copy(update={"algorithm": step_cfg.algorithm.model_copy(update={"use_feature_cache": cached})})
        a = make(c2, ds)
        a._cache = cache
        model, images = a.working_model(model_part(payload)), student_images(d, a.ctx)
        loss_fn, labels = a.local_loss(payload, d), d.labels.long()
        warm = a.cfg.model_copy(update={"batch_size": n})  # one step over all n samples
        local_sgd(model, images, labels, warm, torch.Generator().manual_seed(1), loss_fn)
        model = a.working_model(model_part(payload))
        t0 = time.perf_counter()
        local_sgd(model, images, labels, a.cfg, torch.Generator().manual_seed(0), loss_fn)
        step_s[cached] = time.perf_counter() - t0
    teacher_per_step = (step_s[False] - step_s[True]) / args.steps
    total_steps = sum(args.local_epochs * -(-len(ds.client_samples(c)) // cfg.algorithm.batch_size) for c in clients)
    cached_clients = sum(client_s.values())
    uncached_clients = cached_clients + total_steps * teacher_per_step

    result = {
        "device": "cpu", "precision": args.precision, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "clip": "ViT-B-32 (untrained)", "clients": clients, "local_epochs": args.local_epochs,
        "client_sizes": {c: int(len(ds.client_samples(c))) for c in clients},
        "local_steps_total": int(total_steps),
        "client_s": {str(c): s for c, s in client_s.items()},
        "clients_cached_s": cached_clients,
        "clients_per_step_teacher_s_extrapolated": uncached_clients,
        "fixed_steps": args.steps, "fixed_steps_cached_s": step_s[True], "fixed_steps_per_step_teacher_s": step_s[False],
        "local_step_speedup": step_s[False] / step_s[True],
        "teacher_overhead_per_step_s": teacher_per_step,
        "server_s": server_s, **{f"server_{k}": v for k, v in timings.items()},
        "cache_encode_s_per_image": encode_s / len(ids),
        "cache_build_s_estimated_full_store": encode_s / len(ids) * len(ds),
    }
    result["client_speedup"] = uncached_clients / cached_clients
    result["round_cached_s"] = cached_clients + server_s
    result["round_per_step_teacher_s"] = uncached_clients + server_s
    result["round_speedup"] = result["round_per_step_teacher_s"] / result["round_cached_s"]
    rows = [
        ("clients (sum of client_update), s", f"{cached_clients:.1f}", f"{uncached_clients:.1f} (extrapolated)"),
        (f"  {args.steps} local steps of client {clients[0]}, s", f"{step_s[True]:.2f}", f"{step_s[False]:.2f} (measured)"),
        ("  local-step speed-up (bound for any cache)", f"{result['local_step_speedup']:.1f}x", ""),
        ("server: FedAvg, s", f"{timings['fedavg_s']:.2f}", "same"),
        ("server: matching (100 steps, GML + PCL), s", f"{timings['match_s']:.2f}", "same"),
        ("server: re-training (300 epochs), s", f"{timings['retrain_s']:.2f}", "same"),
        ("round total, s", f"{result['round_cached_s']:.1f}", f"{result['round_per_step_teacher_s']:.1f}"),
        ("client speed-up (per-step / cached)", f"{result['client_speedup']:.1f}x", ""),
    ]
    print(f"CLIP2FL round 1, CIFAR-10-LT IF100, clients {clients}, {args.local_epochs} local epochs, "
          f"{total_steps} local steps, ViT-B-32 untrained, {args.precision}, CPU ({torch.get_num_threads()} threads)")
    print(f"{'':48s} {'cached teacher':>16s} {'per-step teacher':>26s}")
    for name, a, b in rows:
        print(f"{name:48s} {a:>16s} {b:>26s}")
    print(f"one-off cache: {result['cache_encode_s_per_image'] * 1000:.1f} ms/image "
          f"(~{result['cache_build_s_estimated_full_store']:.0f} s for all {len(ds)} images of the store)")
    out = ROOT / f"benchmarks/results/clip2fl_round{'' if args.precision == 'fp32' else '_' + args.precision}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
