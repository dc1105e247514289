"""Orchestration overhead of the round engine on a CLIP2FL-shaped schedule.

20 logical clients, 8 per round, ResNet-8 payload (5.4 MB), on `--actors` client actors. Each
client does a fixed, known amount of work (the `synthetic` algorithm busy-waits `work_s`), so the
ideal round time is exact: the measured client durations list-scheduled on the actors, plus the
server's own time. Overhead = wall - ideal. Prints a table and writes JSON.

    python benchmarks/overhead.py [--actors 2] [--rounds 6] [--work 0.05 0.5 2] [--gpus-per-client 0]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from fedplatform.config import validate
from fedplatform.experiment import ensure_ray, run_experiment


def config(tmp: Path, work_s: float, actors: int, rounds: int, gpus: float) -> dict:
    return {
        "name": f"overhead-{work_s}",
        "data": {"dataset": "digits", "cache_dir": str(tmp / "cache")},
        "partition": {"scheme": "iid", "num_clients": 20},
        "model": {"name": "resnet8"},
        "algorithm": {"name": "synthetic", "work_s": work_s},
        "rounds": rounds,
        "clients_per_round": 8,
        "runtime": {"num_client_actors": actors, "storage": str(tmp / "runs"), "eval_every": rounds,
                    "checkpoint_every": 10**6,
                    "client_resources": {"num_cpus": 1, "num_gpus": gpus},
                    "server_resources": {"num_cpus": 0}},
        "tracking": {"experiment": "benchmark-overhead"},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6, help="rounds per setting; the first is warm-up")
    ap.add_argument("--work", type=float, nargs="+", default=[0.05, 0.5, 2.0])
    ap.add_argument("--gpus-per-client", type=float, default=0.0)
    ap.add_argument("--out", default="benchmarks/results/overhead.json")
    args = ap.parse_args(argv)
    ensure_ray()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        for work_s in args.work:
            cfg = validate(config(tmp, work_s, args.actors, args.rounds, args.gpus_per_client))
            history = run_experiment(cfg, tracking_uri=uri, progress=False).history[1:]
            mean = lambda key: statistics.fmean(h[key] for h in history)  # noqa: E731
            wall, client, server = mean("time/round_s"), mean("time/client_compute_s"), mean("time/server_s")
            overhead = wall - client - server
            rows.append({
                "work_s": work_s, "actors": args.actors, "rounds_measured": len(history),
                "round_wall_s": wall, "ideal_s": client + server, "overhead_s": overhead,
                "overhead_pct": 100 * overhead / wall, "overhead_per_client_ms": 1000 * overhead / 8,
            })
    print(f"{'work/client':>11} {'wall/round':>10} {'ideal':>8} {'overhead':>9} {'overhead %':>10} {'ms/client':>9}")
    for r in rows:
        print(f"{r['work_s']:>10.2f}s {r['round_wall_s']:>9.3f}s {r['ideal_s']:>7.3f}s {r['overhead_s']:>8.3f}s "
              f"{r['overhead_pct']:>9.1f}% {r['overhead_per_client_ms']:>9.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
