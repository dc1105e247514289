"""One CLIP2FL round at the reference settings on CIFAR-10-LT (IF 100, reference partition, K = 20,
the reference round-1 sample of 8 clients, ViT-B-32 UNTRAINED: timing only): cached teacher vs the
reference per-step teacher (CLIP on the 224 bicubic view of every batch).

    tar -xf ../shared/datasets/cifar10-jpeg.tar -C /tmp
    python benchmarks/clip2fl_round.py --root /tmp/cifar10-jpeg [--local-epochs 10] [--clients 8] [--steps 5]
        [--precision fp32|bf16] [--device cpu|cuda]

Client time: every sampled client's full `client_update` with the cached teacher (local epochs as
given). The per-step teacher is far too slow for whole clients on a CPU, so both teachers are also
timed on the same local steps (`--steps` batches of one client, local training alone, after one
warm-up step); the per-step teacher's whole-round client time is extrapolated from that per-step
overhead and stated as such. The per-step ratio of those local steps is the most any teacher cache
can gain per step. `--precision bf16` runs local training, and with it the per-step teacher, under
bf16 autocast (the cache stays fp32). Server time = FedAvg + feature matching (match_epoch 100, GML + eta·PCL) + re-training
(crt_epoch 300, 9,600 steps), each timed. The feature cache is a one-off (built before round 1):
its cost is reported per image, measured on the sampled clients' images. `--device cuda` runs
everything on the GPU (timings taken after a synchronize). `measure()` is what
benchmarks/gpu_check.py reuses.
Prints a table and writes benchmarks/results/clip2fl_round[_bf16][_cuda].json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch

from fedplatform.algorithms import ClientData, Context, get_algorithm
from fedplatform.algorithms.creff import device_clock, model_part
from fedplatform.algorithms.fedavg import local_sgd
from fedplatform.algorithms.images import student_images
from fedplatform.config import load_config
from fedplatform.data import prepare
from fedplatform.models.feature_cache import encode_samples

ROOT = Path(__file__).resolve().parents[1]
ROUND1 = [1, 17, 2, 5, 11, 0, 18, 6]
"""Reference client sample of round 1 (RandomState(7), K = 20, 8 per round; spec §3.2)."""


def make(cfg, ds, device=torch.device("cpu")):
    ctx = Context(cfg=cfg, num_classes=ds.num_classes, class_names=ds.class_names, image_shape=ds.image_shape,
                  norm_mean=ds.norm_mean, norm_std=ds.norm_std, train_class_counts=ds.train_class_counts,
                  device=device, dataset=ds)
    algo = get_algorithm("clip2fl")(ctx)
    algo.load_clip()  # per-actor one-off (CLIP load, text prototypes)
    return algo


def client_data(ds, cid, limit=None):
    ids = ds.client_samples(cid)
    if limit is not None:
        ids = ids[:limit]
    return ClientData(cid, torch.from_numpy(ds.pixels(ids)), torch.from_numpy(np.asarray(ds.labels[ids])), ids)


def measure(root, local_epochs: int = 10, clients: int = 8, steps: int = 5, precision: str = "fp32",
            device: str = "cpu") -> dict:
    """One round as described above; returns the result dict (the JSON this script writes)."""
    dev = torch.device(device)
    base = [f"data.root={root}", "clip.pretrained=null", f"algorithm.precision={precision}"]
    cfg = load_config(ROOT / "pipelines/clip2fl_cifar10_lt.yaml", base + [f"algorithm.local_epochs={local_epochs}"])
    ds = prepare(cfg)
    clients = ROUND1[:clients]
    algo = make(cfg, ds, dev)

    # One-off cache, restricted to the sampled clients' images (the full build is the same per image).
    ids = np.concatenate([ds.client_samples(c) for c in clients])
    t0 = device_clock(dev)
    emb = encode_samples(algo.clip, algo.preprocess, ds, ids)
    encode_s = device_clock(dev) - t0
    cache = np.zeros((len(ds), emb.shape[1]), np.float32)
    cache[ids] = emb
    algo._cache = cache

    # Full round, cached teacher.
    state = algo.init_server_state(cfg.seed)
    payload = algo.broadcast(state)
    updates, client_s = [], {}
    for c in clients:
        t0 = device_clock(dev)
        updates.append(algo.client_update(payload, client_data(ds, c), torch.Generator().manual_seed(c)))
        client_s[c] = device_clock(dev) - t0
    t0 = device_clock(dev)
    algo.aggregate(state, sorted(updates, key=lambda u: u.client_id), 1)
    server_s = device_clock(dev) - t0
    timings = dict(algo.timings)

    # The same local steps of one client (one epoch over steps * batch samples), both teachers:
    # local training alone, after a one-step warm-up.
    n = steps * cfg.algorithm.batch_size
    step_cfg = load_config(ROOT / "pipelines/clip2fl_cifar10_lt.yaml", base + ["algorithm.local_epochs=1"])
    d = client_data(ds, clients[0], limit=n)
    step_s = {}
    for cached in (True, False):
        c2 = step_cfg.model_copy(update={"algorithm": step_cfg.algorithm.model_copy(update={"use_feature_cache": cached})})
        a = make(c2, ds, dev)
        a._cache = cache
        model, images = a.working_model(model_part(payload)), student_images(d, a.ctx)
        loss_fn, labels = a.local_loss(payload, d), d.labels.long().to(dev)
        warm = a.cfg.model_copy(update={"batch_size": n})  # one step over all n samples
        local_sgd(model, images, labels, warm, torch.Generator().manual_seed(1), loss_fn)
        model = a.working_model(model_part(payload))
        t0 = device_clock(dev)
        local_sgd(model, images, labels, a.cfg, torch.Generator().manual_seed(0), loss_fn)
        step_s[cached] = device_clock(dev) - t0
    teacher_per_step = (step_s[False] - step_s[True]) / steps
    total_steps = sum(local_epochs * -(-len(ds.client_samples(c)) // cfg.algorithm.batch_size) for c in clients)
    cached_clients = sum(client_s.values())
    uncached_clients = cached_clients + total_steps * teacher_per_step

    result = {
        "device": device, "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "precision": precision, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "clip": "ViT-B-32 (untrained)", "clients": clients, "local_epochs": local_epochs,
        "client_sizes": {c: int(len(ds.client_samples(c))) for c in clients},
        "local_steps_total": int(total_steps),
        "client_s": {str(c): s for c, s in client_s.items()},
        "clients_cached_s": cached_clients,
        "clients_per_step_teacher_s_extrapolated": uncached_clients,
        "fixed_steps": steps, "fixed_steps_cached_s": step_s[True], "fixed_steps_per_step_teacher_s": step_s[False],
        "local_step_speedup": step_s[False] / step_s[True],
        "teacher_overhead_per_step_s": teacher_per_step,
        "server_s": server_s, **{f"server_{k}": v for k, v in timings.items()},
        "cache_encode_s_per_image": encode_s / len(ids),
        "cache_build_s_estimated_full_store": encode_s / len(ids) * len(ds), "store_images": len(ds),
    }
    result["client_speedup"] = uncached_clients / cached_clients
    result["round_cached_s"] = cached_clients + server_s
    result["round_per_step_teacher_s"] = uncached_clients + server_s
    result["round_speedup"] = result["round_per_step_teacher_s"] / result["round_cached_s"]
    return result


def print_table(r: dict) -> None:
    where = f"GPU ({r['gpu']})" if r["gpu"] else f"CPU ({r['threads']} threads)"
    rows = [
        ("clients (sum of client_update), s", f"{r['clients_cached_s']:.1f}",
         f"{r['clients_per_step_teacher_s_extrapolated']:.1f} (extrapolated)"),
        (f"  {r['fixed_steps']} local steps of client {r['clients'][0]}, s", f"{r['fixed_steps_cached_s']:.2f}",
         f"{r['fixed_steps_per_step_teacher_s']:.2f} (measured)"),
        ("  local-step speed-up (bound for any cache)", f"{r['local_step_speedup']:.1f}x", ""),
        ("server: FedAvg, s", f"{r['server_fedavg_s']:.2f}", "same"),
        ("server: matching (100 steps, GML + PCL), s", f"{r['server_match_s']:.2f}", "same"),
        ("server: re-training (300 epochs), s", f"{r['server_retrain_s']:.2f}", "same"),
        ("round total, s", f"{r['round_cached_s']:.1f}", f"{r['round_per_step_teacher_s']:.1f}"),
        ("client speed-up (per-step / cached)", f"{r['client_speedup']:.1f}x", ""),
    ]
    print(f"CLIP2FL round 1, CIFAR-10-LT IF100, clients {r['clients']}, {r['local_epochs']} local epochs, "
          f"{r['local_steps_total']} local steps, ViT-B-32 untrained, {r['precision']}, {where}")
    print(f"{'':48s} {'cached teacher':>16s} {'per-step teacher':>26s}")
    for name, a, b in rows:
        print(f"{name:48s} {a:>16s} {b:>26s}")
    print(f"one-off cache: {r['cache_encode_s_per_image'] * 1000:.1f} ms/image "
          f"(~{r['cache_build_s_estimated_full_store']:.0f} s for all {r['store_images']} images of the store)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/cifar10-jpeg")
    ap.add_argument("--local-epochs", type=int, default=10)
    ap.add_argument("--clients", type=int, default=8, help="how many of the round-1 clients to run")
    ap.add_argument("--steps", type=int, default=5, help="local steps timed for the cached vs per-step comparison")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = ap.parse_args()
    os.environ.setdefault("FEDPLATFORM_CACHE", str(Path(tempfile.gettempdir()) / "fedplatform-bench-cache"))
    result = measure(args.root, args.local_epochs, args.clients, args.steps, args.precision, args.device)
    print_table(result)
    suffix = ("" if args.precision == "fp32" else "_" + args.precision) + ("" if args.device == "cpu" else "_cuda")
    out = ROOT / f"benchmarks/results/clip2fl_round{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
