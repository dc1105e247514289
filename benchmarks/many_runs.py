"""Many short runs in one Python process, each starting its own actors or, inside
`fedplatform.reuse_actors()`, taking the last run's: wall time and start-up per run.

One process, one local Ray (started by a first, unmeasured run). Then `--blocks` blocks alternate
between the two modes, each of `--runs` runs of the digits twin (`benchmarks/pipelines/
flower_twin_digits.yaml`, `--rounds` rounds, a different seed per run); in a reuse block the
first run starts the actors the others take. The table gives medians over the runs after each
block's first; the JSON (benchmarks/results/many_runs.json) every run.

    python benchmarks/many_runs.py                 # 2 blocks of each mode, 4 runs each, 10 rounds
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

PIPELINE = Path(__file__).parent / "pipelines" / "flower_twin_digits.yaml"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=2, help="blocks of each mode, alternated")
    p.add_argument("--runs", type=int, default=4, help="runs per block")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "many_runs.json"))
    args = p.parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import fedplatform
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory(prefix="many-runs-") as work:
        uri = f"sqlite:///{work}/mlflow.db"
        client = MlflowClient(uri)
        seed = iter(range(10**6))

        def one() -> dict:
            cfg = fedplatform.load_config(PIPELINE, [f"seed={next(seed)}", f"rounds={args.rounds}",
                                                     f"runtime.storage={work}/runs"])
            start = time.perf_counter()
            result = fedplatform.run(cfg, tracking_uri=uri)
            wall = time.perf_counter() - start
            return {"wall_s": wall, "startup_s": client.get_run(result.run_id).data.metrics["time/startup_s"]}

        one()  # starts Ray and imports everything
        runs: dict[str, list[list[dict]]] = {"new actors": [], "reuse_actors": []}
        for i in range(2 * args.blocks):
            mode = list(runs)[i % 2]
            with fedplatform.reuse_actors() if mode == "reuse_actors" else contextlib.nullcontext():
                runs[mode].append([one() for _ in range(args.runs)])
            print(f"block {i + 1}: {mode}: " + ", ".join(f"{r['wall_s']:.2f}" for r in runs[mode][-1]) + " s",
                  flush=True)
    print("\n| per run (after each block's first) | wall | start-up |\n|---|---|---|")
    for mode, blocks in runs.items():
        later = [r for block in blocks for r in block[1:]]
        print(f"| {mode} | {statistics.median(r['wall_s'] for r in later):.2f} s | "
              f"{statistics.median(r['startup_s'] for r in later):.2f} s |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"pipeline": str(PIPELINE), "rounds": args.rounds, "runs": runs,
                                          "cpus": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
