"""Cost of many logical clients: 100, 1,000 and 10,000 clients on 2 actors, 10 per round.

Time per round and the resident memory of the driver and of the actors must stay flat in the
number of logical clients (actors load the memory-mapped store once and run any client).
Uses CIFAR-10 (class-folder JPEGs or pickles) so 10,000 clients get 5 samples each; the
`synthetic` algorithm (fixed 10 ms of work per client) isolates the platform's own cost.

    python benchmarks/scale.py --data-root /tmp/cifar10-jpeg [--clients 100 1000 10000] [--rounds 6]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import ray

from fedplatform.config import validate
from fedplatform.experiment import ensure_ray, run_experiment


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", required=True, help="CIFAR-10 directory (class folders or pickles)")
    ap.add_argument("--clients", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--rounds", type=int, default=6, help="rounds per setting; the first is warm-up")
    ap.add_argument("--out", default="benchmarks/results/scale.json")
    args = ap.parse_args(argv)
    ensure_ray()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for k in args.clients:
            cfg = validate({
                "name": f"scale-{k}",
                "data": {"dataset": "cifar10", "root": args.data_root, "cache_dir": str(tmp / "cache")},
                "partition": {"scheme": "iid", "num_clients": k},
                "model": {"name": "resnet8"},
                "algorithm": {"name": "synthetic", "work_s": 0.01},
                "rounds": args.rounds, "clients_per_round": 10,
                "runtime": {"num_client_actors": 2, "storage": str(tmp / "runs"), "eval_every": 10**6,
                            "checkpoint_every": 10**6, "server_resources": {"num_cpus": 0}},
                "tracking": {"experiment": "benchmark-scale"},
            })
            result = run_experiment(cfg, tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}", progress=False)
            history = result.history[1:]
            rows.append({
                "logical_clients": k,
                "round_s": statistics.fmean(h["time/round_s"] for h in history),
                "orchestration_s": statistics.fmean(h["time/orchestration_s"] for h in history),
                "driver_rss_mb": rss_mb(os.getpid()),
                "client_actor_rss_mb": max(h["memory/client_actor_rss_mb"] for h in history),
                "server_actor_rss_mb": max(h["memory/server_rss_mb"] for h in history),
            })
    print(f"{'clients':>8} {'s/round':>8} {'orch s':>7} {'driver MB':>9} {'client actor MB':>15} {'server MB':>9}")
    for r in rows:
        print(f"{r['logical_clients']:>8} {r['round_s']:>8.3f} {r['orchestration_s']:>7.3f} {r['driver_rss_mb']:>9.0f} "
              f"{r['client_actor_rss_mb']:>15.0f} {r['server_actor_rss_mb']:>9.0f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
