"""The platform at scale: clients per round, and logical clients, on 2 client actors.

`--mode per-round`: 10, 100 and 500 clients per round, each returning a `synthetic` update of
`--update-mb` (default 50) MB. Peak server memory must not grow with clients per round (the
server folds updates in as they arrive), and orchestration per round must stay small. Uses
sklearn's digits, so it needs no download.

`--mode population`: 100, 1,000 and 10,000 logical clients, 100 per round: time per round and the
driver's and actors' memory must stay flat (actors map the store once and run any client). Needs
CIFAR-10 (class-folder JPEGs or pickles) so 10,000 clients get 5 samples each.

The server's memory is sampled from /proc every 20 ms by the driver (peak private, i.e. RssAnon:
what the process itself holds, without the object store's shared pages; and peak RSS).

    python benchmarks/scale.py --mode per-round [--per-round 10 100 500] [--update-mb 50] [--rounds 3]
    python benchmarks/scale.py --mode population --data-root /tmp/cifar10-jpeg [--clients 100 1000 10000]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
from pathlib import Path

import ray

from fedplatform.config import validate
from fedplatform.experiment import run_experiment


def proc_mb(pid: int, field: str) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024
    except (OSError, StopIteration):
        return 0.0


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


class ServerMemory(threading.Thread):
    """Peak RssAnon and VmRSS of this Ray's ServerActor processes (workers are the raylet's children)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
        self.peak_private = self.peak_rss = 0.0
        self.stop = threading.Event()

    def servers(self) -> list[int]:
        found = []
        for pid in children(self.raylet):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if f.read().startswith(b"ray::ServerActor"):
                        found.append(pid)
            except OSError:
                pass
        return found

    def run(self):
        pids: list[int] = []
        while not self.stop.wait(0.02):
            if not pids or not all(os.path.exists(f"/proc/{p}") for p in pids):
                pids = self.servers()
            for p in pids:
                self.peak_private = max(self.peak_private, proc_mb(p, "RssAnon"))
                self.peak_rss = max(self.peak_rss, proc_mb(p, "VmRSS"))


def measure(raw: dict, tmp: Path) -> dict:
    cfg = validate(raw)
    mem = ServerMemory()
    mem.start()
    try:
        result = run_experiment(cfg, tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}", progress=False)
    finally:
        mem.stop.set()
        mem.join()
    history = result.history[1:]  # the first round is warm-up
    return {
        "round_s": statistics.fmean(h["time/round_s"] for h in history),
        "orchestration_s": statistics.fmean(h["time/orchestration_s"] for h in history),
        "server_peak_private_mb": mem.peak_private,
        "server_peak_rss_mb": mem.peak_rss,
        "driver_rss_mb": proc_mb(os.getpid(), "VmRSS"),
        "client_actor_rss_mb": max(h["memory/client_actor_rss_mb"] for h in history),
    }


def base(name: str, tmp: Path, rounds: int, per_round: int) -> dict:
    return {
        "name": name, "rounds": rounds, "clients_per_round": per_round,
        "runtime": {"num_client_actors": 2, "storage": str(tmp / "runs"), "eval_every": 10**6,
                    "checkpoint_every": 10**6, "server_resources": {"num_cpus": 0},
                    "server_process": "actor"},  # its own process, so its memory is told apart from the driver's
        "tracking": {"experiment": "benchmark-scale"},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["per-round", "population"], default="per-round")
    ap.add_argument("--per-round", type=int, nargs="+", default=[10, 100, 500], help="per-round mode")
    ap.add_argument("--update-mb", type=float, default=50.0, help="per-round mode: size of each client's update")
    ap.add_argument("--work-s", type=float, default=0.01, help="busy work per client")
    ap.add_argument("--data-root", help="population mode: CIFAR-10 directory (class folders or pickles)")
    ap.add_argument("--clients", type=int, nargs="+", default=[100, 1000, 10000], help="population mode")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per setting; the first is warm-up")
    ap.add_argument("--label", default="", help="a name for this build in the output (e.g. before, after)")
    ap.add_argument("--out", default=None, help="JSON file (default benchmarks/results/scale-<mode>.json)")
    args = ap.parse_args(argv)
    if args.mode == "population" and not args.data_root:
        ap.error("--mode population needs --data-root (CIFAR-10)")
    ray.init(address="local", include_dashboard=False, logging_level="WARNING")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.mode == "per-round":
            for k in args.per_round:
                raw = base(f"scale-per-round-{k}", tmp, args.rounds, k)
                raw |= {"data": {"dataset": "digits", "cache_dir": str(tmp / "cache")},
                        "partition": {"scheme": "iid", "num_clients": max(args.per_round)},
                        "model": {"name": "small_cnn"},
                        "algorithm": {"name": "synthetic", "work_s": args.work_s, "update_mb": args.update_mb}}
                rows.append({"clients_per_round": k, "update_mb": args.update_mb, **measure(raw, tmp)})
                print(rows[-1], file=sys.stderr, flush=True)
        else:
            for k in args.clients:
                raw = base(f"scale-population-{k}", tmp, args.rounds, min(100, k))
                raw |= {"data": {"dataset": "cifar10", "root": args.data_root, "cache_dir": str(tmp / "cache")},
                        "partition": {"scheme": "iid", "num_clients": k},
                        "model": {"name": "resnet8"},
                        "algorithm": {"name": "synthetic", "work_s": args.work_s}}
                rows.append({"logical_clients": k, "clients_per_round": min(100, k), **measure(raw, tmp)})
                print(rows[-1], file=sys.stderr, flush=True)
    key = "clients_per_round" if args.mode == "per-round" else "logical_clients"
    print(f"{args.label:>7} {key:>18} {'s/round':>8} {'orch s/round':>12} {'server peak private MB':>22} "
          f"{'server peak RSS MB':>18} {'driver MB':>9} {'client actor MB':>15}")
    for r in rows:
        print(f"{args.label:>7} {r[key]:>18} {r['round_s']:>8.3f} {r['orchestration_s']:>12.3f} "
              f"{r['server_peak_private_mb']:>22.0f} {r['server_peak_rss_mb']:>18.0f} {r['driver_rss_mb']:>9.0f} "
              f"{r['client_actor_rss_mb']:>15.0f}")
    out = Path(args.out or f"benchmarks/results/scale-{args.mode}{'-' + args.label if args.label else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"label": args.label, "mode": args.mode, "rows": rows}, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
