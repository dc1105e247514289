"""The quickstart sweep's wall time, code against code: each tree's `fedplatform sweep
tune_spaces/quickstart_sweep.yaml` as a user types it (a fresh process, its own local Ray, a fresh
working directory), the trees run alternately, a pause between processes for the previous Ray to
go away. Each tree's data cache is warmed first (`fedplatform data describe`), so every sweep
starts from a prepared store. The table gives each run and the median per tree.

    git worktree add /tmp/before 6e340d8
    python benchmarks/sweep_wall.py --tree before=/tmp/before --tree after=. --pairs 2

Each tree runs with PYTHONPATH set to it (the venv's own fedplatform is shadowed), so both use
this interpreter and its packages; the JSON goes to benchmarks/results/sweep_wall.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPACE = "tune_spaces/quickstart_sweep.yaml"


def env_for(tree: Path, cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return dict(env, PYTHONPATH=str(tree), FEDPLATFORM_CACHE=str(cache), FEDPLATFORM_OFFLINE="1")


def sweep_once(tree: Path, cache: Path) -> float:
    with tempfile.TemporaryDirectory(prefix="sweep-wall-") as work:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "fedplatform.cli", "sweep", str(tree / SPACE)], cwd=work,
                              env=env_for(tree, cache), capture_output=True, text=True)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"the sweep of {tree} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", action="append", required=True, metavar="NAME=PATH",
                   help="a checkout of fedplatform to time (repeatable; alternated in the order given)")
    p.add_argument("--pairs", type=int, default=2, help="rounds of alternation (each tree once per round)")
    p.add_argument("--pause", type=float, default=5.0, help="seconds between processes")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "sweep_wall.json"))
    args = p.parse_args()
    trees = {name: Path(path).resolve() for name, path in (t.split("=", 1) for t in args.tree)}
    with tempfile.TemporaryDirectory(prefix="sweep-wall-cache-") as caches:
        for name, tree in trees.items():  # a prepared store per tree: the sweeps time training, not preparation
            subprocess.run([sys.executable, "-m", "fedplatform.cli", "data", "describe",
                            str(tree / "pipelines/quickstart.yaml")], env=env_for(tree, Path(caches, name)),
                           check=True, capture_output=True)
        walls: dict[str, list[float]] = {name: [] for name in trees}
        for i in range(args.pairs):
            order = list(trees) if i % 2 == 0 else list(reversed(trees))
            for name in order:
                walls[name].append(sweep_once(trees[name], Path(caches, name)))
                print(f"pair {i + 1}: {name} {walls[name][-1]:.1f} s", file=sys.stderr, flush=True)
                time.sleep(args.pause)
    print("| tree | runs (s) | median (s) |\n|---|---|---|")
    for name, w in walls.items():
        print(f"| {name} | {', '.join(f'{x:.1f}' for x in w)} | {statistics.median(w):.1f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"space": SPACE, "trees": {n: str(t) for n, t in trees.items()},
                                          "walls_s": walls, "cpus": os.cpu_count()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
