"""GPU check (issue 14): what a lent GPU machine should run, in one go (under 8 min on one H100/H200).

    bash benchmarks/gpu_check.sh [--root CIFAR10_DIR] [--rounds 3] [--client-actors 4 ...] [--out FILE]

(a) `pytest -m gpu tests/test_gpu.py`: fractional client actors capped to their memory share (one
    over its share fails alone), 1 vs 2 GPU client actors bit-identical;
(b) benchmarks/clip2fl_round.py on the GPU in fp32 and bf16: one reference round, cached vs
    per-step teacher (ViT-B-32 untrained);
(c) the CLIP feature-cache build of the CIFAR-10-LT store (ViT-B-32 untrained, in this process on
    the GPU), in images/s;
(d) pipelines/clip2fl_cifar10_lt.yaml (ViT-B-32 untrained) for a few rounds on Ray (the server at
    0.2 GPU, 4 client actors sharing the rest; `--client-actors 4 8` times each count in turn),
    extrapolated to its 200 rounds. It reuses (c)'s cache.
(e) the server's feature matching and classifier re-training (launch-bound small steps) timed on
    the GPU and on the CPU, at the reference sizes (run before (d), being short).
Then one table, and one JSON (benchmarks/results/gpu_check.json) rewritten after every part, so a
run cut short (gpu_check.sh stops it with SIGINT at its time limit) keeps what it measured.

Data: --root, else $CIFAR10_ROOT, else ../shared/datasets/cifar10-jpeg.tar extracted to a temp
dir, else random CIFAR-10-shaped pixels (50,000 + 10,000 images: the same long tail, partition and
amount of work, so the timings hold; accuracies mean nothing). No network, no pretrained weights.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from xml.etree import ElementTree

import torch

ROOT = Path(__file__).resolve().parents[1]
# This checkout's fedplatform, here and in pytest's and Ray's processes (they inherit the environment).
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

PIPELINE = ROOT / "pipelines/clip2fl_cifar10_lt.yaml"
TAR = ROOT.parent / "shared/datasets/cifar10-jpeg.tar"
NO_CUDA = "gpu_check: CUDA is required (torch.cuda.is_available() is false here); run it on a machine with an NVIDIA GPU"


def ray_layout(client_actors: int) -> list[str]:
    """(d): the server takes 0.2 of the GPU and the client actors share the rest equally (each
    fraction is also that actor's memory cap); 8 CPUs among the clients, 2 for the server."""
    return ["runtime.device=cuda", f"runtime.num_client_actors={client_actors}",
            f"runtime.client_resources.num_cpus={max(1, 8 // client_actors)}",
            f"runtime.client_resources.num_gpus={0.8 / client_actors:g}",
            "runtime.server_resources.num_cpus=2", "runtime.server_resources.num_gpus=0.2"]


def cifar10(root: str | None, work: Path) -> tuple[str, str]:
    """(data.root, what the data are)."""
    if root:
        return root, f"CIFAR-10 at {root}"
    if TAR.is_file():
        subprocess.run(["tar", "-xf", str(TAR), "-C", str(work)], check=True)
        return str(work / "cifar10-jpeg"), f"CIFAR-10 JPEG ({TAR.name}, extracted to a temp dir)"
    from test_sources import tiny_cifar, write_cifar10_pickles

    print(f"gpu_check: no --root, $CIFAR10_ROOT or {TAR}: parts (b)-(d) run on random CIFAR-10-shaped pixels "
          "(timing only)", flush=True)
    write_cifar10_pickles(work / "synthetic" / "cifar-10-batches-py", *tiny_cifar(n_train=50_000, n_test=10_000))
    return str(work / "synthetic"), "random pixels in the CIFAR-10 layout, 50,000 + 10,000 images (timing only)"


def gpu_tests(work: Path, timeout_s: float):
    xml = work / "gpu-tests.xml"
    start = time.perf_counter()
    rc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-rs",
                         "-p", "no:cacheprovider", f"--junitxml={xml}"], cwd=ROOT, timeout=timeout_s).returncode
    if rc == 5:
        raise RuntimeError("pytest collected no gpu tests (exit 5)")
    if not xml.exists():
        raise RuntimeError(f"pytest exited with {rc} and wrote no report")
    suite = ElementTree.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    n["passed"] = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    out = {"exit_code": rc, **n, "seconds": time.perf_counter() - start, "ok": rc == 0 and n["skipped"] == 0}
    summary = f"{n['passed']} passed, {n['failures'] + n['errors']} failed, {n['skipped']} skipped ({out['seconds']:.0f} s)"
    return out, [("(a) pytest -m gpu", "tests/test_gpu.py", summary)]


def clip2fl_rounds(root: str, local_epochs: int, clients: int, steps: int, device: str = "cuda"):
    import clip2fl_round  # benchmarks/, beside this file

    out, rows = {}, []
    for precision in ("fp32", "bf16"):
        r = out[precision] = clip2fl_round.measure(root, local_epochs, clients, steps, precision, device)
        name = f"(b) CLIP2FL round 1, {precision}"
        rows += [(name, f"{len(r['clients'])} clients, cached teacher",
                  f"{r['round_cached_s']:.1f} s (clients {r['clients_cached_s']:.1f} + server {r['server_s']:.1f})"),
                 ("", "per-step teacher",
                  f"{r['round_per_step_teacher_s']:.1f} s (clients extrapolated from {steps} steps); "
                  f"local steps {r['local_step_speedup']:.1f}x slower than cached")]
        gc.collect()
        torch.cuda.empty_cache()
    return out, rows


def feature_cache(root: str):
    from fedplatform.config import load_config
    from fedplatform.data import prepare
    from fedplatform.models.feature_cache import DEFAULT_BATCH_SIZE, build_feature_cache

    cfg = load_config(PIPELINE, [f"data.root={root}", "clip.pretrained=null"])
    ds = prepare(cfg)
    start = time.perf_counter()
    build_feature_cache(cfg, ds, use_ray=False)  # preprocessing, encoding, writing and checksumming
    seconds = time.perf_counter() - start
    out = {"images": len(ds), "seconds": seconds, "images_per_s": len(ds) / seconds, "batch_size": DEFAULT_BATCH_SIZE,
           "clip": "ViT-B-32 (untrained)", "torch_threads": torch.get_num_threads()}
    gc.collect()
    torch.cuda.empty_cache()
    return out, [("(c) feature-cache build, ViT-B-32", f"{len(ds):,} images, batch {DEFAULT_BATCH_SIZE}",
                  f"{out['images_per_s']:,.0f} images/s ({seconds:.1f} s)")]


def reference_schedule(root: str, work: Path, rounds: int, client_actors: int):
    from fedplatform.config import load_config
    from fedplatform.experiment import run_experiment

    full = load_config(PIPELINE, [f"data.root={root}"]).rounds
    layout = ray_layout(client_actors)
    cfg = load_config(PIPELINE, [f"data.root={root}", "clip.pretrained=null", f"rounds={rounds}", *layout,
                                 f"runtime.storage={work / 'runs'}", "tracking.experiment=gpu_check"])
    start = time.perf_counter()
    result = run_experiment(cfg, tracking_uri=f"sqlite:///{work / 'mlflow.db'}", progress=False)
    wall = time.perf_counter() - start
    round_s = [h["time/round_s"] for h in result.history]
    later = slice(1, None) if len(round_s) > 1 else slice(None)  # round 1 carries the warm-up
    steady = statistics.fmean(round_s[later])
    startup = wall - sum(round_s)
    out = {"rounds_timed": rounds, "round_s": round_s, "steady_round_s": steady, "startup_and_end_s": startup,
           "client_compute_s": [h["time/client_compute_s"] for h in result.history],
           "server_s": [h["time/server_s"] for h in result.history],
           "accuracy": [h.get("accuracy") for h in result.history], "layout": layout, "reference_rounds": full,
           "extrapolated_full_s": startup + round_s[0] + (full - 1) * steady,
           "extrapolation": f"start-up + round 1 + {full - 1} x the mean of rounds 2..{rounds} (not measured)"}
    per_round = (f"{steady:.1f} s/round after round 1 (clients {statistics.fmean(out['client_compute_s'][later]):.1f} s, "
                 f"server {statistics.fmean(out['server_s'][later]):.1f} s)")
    actors = f"{cfg.runtime.num_client_actors} client actors + server"
    return out, [("(d) CLIP2FL CIFAR-10-LT reference", f"{rounds} rounds timed, {actors}", per_round),
                 ("", f"{full} rounds, EXTRAPOLATED", f"~{out['extrapolated_full_s'] / 60:.0f} min (not measured)")]


def server_steps(devices=("cuda", "cpu"), match_epoch: int = 100, crt_epoch: int = 300):
    """(e) the server's two loops of small steps, at the reference schedule's sizes (10 classes x 100
    federated features of 512 dims, batch 32), timed on each device: feature matching (GML only, no
    PCL: `match_epoch` full-batch steps) and classifier re-training (`crt_epoch` epochs, 9,600 steps
    at 300). On a GPU both are launch-bound; this says whether the CPU does them faster."""
    from fedplatform.algorithms.creff import device_clock
    from fedplatform.algorithms.federated_features import (feature_labels, fresh_classifier, init_features,
                                                           retrain_classifier, update_features)

    classes, per_class, dim, batch = 10, 100, 512, 32
    out, rows = {}, []
    for name in devices:
        device = torch.device(name)
        g = torch.Generator().manual_seed(0)
        features = init_features(classes, per_class, dim, g).to(device)
        w0, b0 = fresh_classifier(dim, classes, 1)
        w0, b0 = w0.to(device), b0.to(device)
        # the clients' class gradients (update_features moves them to the features' device)
        real = {c: (torch.randn(classes, dim, generator=g) * 1e-3, torch.randn(classes, generator=g) * 1e-3)
                for c in range(classes)}
        labels = feature_labels(classes, per_class, device)
        update_features(features, w0, b0, real, 2, 0.1)  # warm-up: kernels loaded, allocator primed
        t0 = device_clock(device)
        matched, _ = update_features(features, w0, b0, real, match_epoch, 0.1)
        t1 = device_clock(device)
        retrain_classifier(matched, labels, w0, b0, crt_epoch, 0.01, batch,
                           torch.Generator(device=device).manual_seed(2))
        t2 = device_clock(device)
        steps = crt_epoch * -(-classes * per_class // batch)
        out[name] = {"match_s": t1 - t0, "match_steps": match_epoch, "retrain_s": t2 - t1, "retrain_steps": steps,
                     "retrain_us_per_step": (t2 - t1) / steps * 1e6, "torch_threads": torch.get_num_threads()}
        rows.append(("(e) server steps" if not rows else "", f"on {name}",
                     f"matching {match_epoch} steps {t1 - t0:.2f} s; re-training {steps:,} steps {t2 - t1:.2f} s "
                     f"({out[name]['retrain_us_per_step']:.0f} us/step)"))
    return out, rows


def print_table(rows: list[tuple[str, str, str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    for part, setting, result in rows:
        print(f"{part:{widths[0]}}  {setting:{widths[1]}}  {result}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=os.environ.get("CIFAR10_ROOT"), help="CIFAR-10 (pickles or class folders)")
    ap.add_argument("--rounds", type=int, default=3, help="(d): rounds timed")
    ap.add_argument("--client-actors", type=int, nargs="+", default=[4],
                    help="(d): client actors sharing the GPU; several values time (d) once for each")
    ap.add_argument("--local-epochs", type=int, default=10, help="(b): local epochs")
    ap.add_argument("--clients", type=int, default=8, help="(b): reference round-1 clients run")
    ap.add_argument("--steps", type=int, default=5, help="(b): local steps timed per teacher")
    ap.add_argument("--tests-timeout", type=float, default=240.0, help="(a): seconds")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/gpu_check.json"))
    args = ap.parse_args()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # gpu_check.sh's time limit, even if started in the background
    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    os.environ["FEDPLATFORM_CACHE"] = str(work / "cache")  # a fresh store and feature cache
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
              "cuda": torch.version.cuda, "cpus": os.cpu_count(), "python": platform.python_version(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "data": None, "parts": {}}
    rows = [("part", "setting", "result")]
    parts = [("a", "(a) pytest -m gpu", lambda: gpu_tests(work, args.tests_timeout)),
             ("b", "(b) CLIP2FL round", lambda: clip2fl_rounds(root, args.local_epochs, args.clients, args.steps)),
             ("c", "(c) feature-cache build", lambda: feature_cache(root)),
             ("e", "(e) server steps", server_steps),
             *[("d" if i == 0 else f"d_{n}_actors", "(d) CLIP2FL reference schedule",
                lambda n=n: reference_schedule(root, work, args.rounds, n)) for i, n in enumerate(args.client_actors)]]
    done = 0
    try:
        root, report["data"] = cifar10(args.root, work)
        for key, name, part in parts:
            start = time.perf_counter()
            try:
                result, part_rows = part()
                report["parts"][key] = result | {"wall_s": time.perf_counter() - start}
            except Exception as exc:
                traceback.print_exc()
                error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                report["parts"][key] = {"error": error, "wall_s": time.perf_counter() - start}
                part_rows = [(name, "", f"FAILED: {error[:200]}")]
            rows += part_rows
            done += 1
            out.write_text(json.dumps(report, indent=1))
    except KeyboardInterrupt:
        for key, name, _ in parts[done:]:
            report["parts"][key] = {"not_run": "stopped at the time limit"}
            rows.append((name, "", "NOT RUN: stopped at the time limit"))
    finally:
        report["wall_s"] = sum(p.get("wall_s", 0.0) for p in report["parts"].values())
        out.write_text(json.dumps(report, indent=1))
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nGPU check: {report['gpu']} x{report['gpus']}, torch {report['torch']} (CUDA {report['cuda']}), "
          f"{report['cpus']} CPUs; data: {report['data']}")
    print_table(rows)
    print(f"wrote {out}")
    failed = [k for k, p in report["parts"].items() if "error" in p or "not_run" in p or p.get("ok") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
