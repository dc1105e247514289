"""Flower vs fedplatform on the Flower anchor's two workloads, run alternately, each run a fresh process.

The anchor (`../shared/bench/flower/`, README there) measures Flower 1.41's simulation engine on
two workloads; `benchmarks/pipelines/flower_twin_*.yaml` are fedplatform's twins, run as a user
runs them: `fedplatform run PIPELINE` in a subprocess (`python -m fedplatform.cli`), its own local
Ray. Every pair runs the Flower process and the fedplatform process one after the other (Flower
first in even pairs, fedplatform first in odd ones), digits then overhead, with a pause between
processes for the previous Ray to go away. The table gives the medians over the pairs.

    python benchmarks/flower_twins.py --flower-python /tmp/flwr-venv/bin/python --flower-dir /tmp/flower-anchor
    python benchmarks/flower_twins.py --pairs 1 --digits-rounds 10 --overhead-rounds 3 ...   # a smoke run

Set up Flower as its README says (`python3 -m venv /tmp/flwr-venv && /tmp/flwr-venv/bin/pip install
-r ../shared/bench/flower/requirements.txt`) and copy its two scripts to `--flower-dir`. Without
them the Flower column is skipped (with a message) and only fedplatform runs.

What is measured (all from the driver's clock unless said; Linux, where perf_counter is the
system-wide CLOCK_MONOTONIC, so stamps taken in the Flower process compare with the driver's):
- whole process: the driver's Popen to the process's exit.
- start-up: process start to the first round's start. Flower: Popen to its first `configure_train`;
  its parts: imports (the script imported as a module), the driver's own data and seeding, then
  `run_simulation` until its warm-up replied (of which `ray.init`), then to round 1 (digits: the
  round-0 evaluation). fedplatform: its `time/startup_s` metric (from the process's start time in
  /proc) and parts `time/startup/{imports,data,ray_init,actors,mlflow}_s`; "other" is the rest.
- seconds per round (digits): Flower's 50-round total (first round's start to the end of the last,
  evaluations included) / 50; fedplatform's `time/rounds_total_s` / rounds (the same span, with its
  per-round MLflow metrics and checkpoint).
- overhead per round (overhead workload, W = 0.05 s): mean round wall - ideal, ideal = 8 clients x
  W / 2 actors + server time. Round wall: Flower `configure_train` to the end of `aggregate_train`,
  server time its `aggregate_train`; fedplatform `time/round_s` (the engine's round: payload to the
  server's `finish_round` reply; its MLflow metrics are logged after it), server time `time/server_s`.
  Also in the JSON: overhead against the clients' measured compute (Flower: sum / 2; fedplatform:
  `time/client_compute_s`, the measured durations list-scheduled on the actors).

Differences between the twins (the platform's config cannot express Flower's exactly):
- digits data: fedplatform holds out a stratified 20 % (seed 0; Flower: unstratified
  train_test_split, random_state 0; both 1,437 / 360), keeps pixels as round(x * 255 / 16) uint8
  and normalises them with one global mean/std (0.3053 / 0.3759, over all 1,797 images), where
  Flower standardises each of the 64 features with a StandardScaler fitted on its train split.
  Partition: the same recipe (default_rng(0).permutation, array_split into 100 clients of 14 or 15)
  over a differently ordered pool, so clients hold other samples.
- sampling: fedplatform RandomState(0).choice(100, 10) per round; Flower random.sample over node IDs
  drawn from `secrets` (a different draw every run). Local shuffles: a generator per (seed, round,
  client); Flower torch's seeded 1000 * round + partition. The initial model is the same (seed 0,
  the same layers built in the same order: `mlp`).
- evaluation: fedplatform at rounds 10, 20, ..., 50 on the 360 test images (with per-class and
  many/medium/few accuracy); Flower also at round 0, before its first round (its start-up).
- tracking: fedplatform logs MLflow metrics after every round and writes a checkpoint (safetensors +
  JSON) every round (digits) or after the last (overhead: as benchmarks/overhead.py), opens an
  MLflow run at start and logs the summary, plots and the MLflow model at the end (in "whole
  process"); Flower tracks nothing.
- the server: a Ray actor with num_cpus 0 in fedplatform; a thread in the driver process in Flower.
  Flower's start-up ends with a warm-up (4 query messages, 2 per actor); fedplatform's actors load
  their data in their constructor and take no warm-up message.
- overhead work: fedplatform's `synthetic` busy-waits W on the wall clock; Flower burns a numpy loop
  calibrated (here, once, before the pairs, as its sweep does) to take W with 2 processes busy, so
  its real compute drifts with the machine (compare the JSON's overhead vs measured compute).
  Payload: the `mlp` state, 4,810 float32 (Flower: 1,000 float32). Aggregation is sample-weighted
  (Flower: num-examples 1 each); the platform evaluates after the last round (nothing, for synthetic).
- data preparation: fedplatform's store is prepared once before the pairs (a warm cache, as any run
  after the first finds it); Flower loads and scales digits in every process (milliseconds).
- the Flower script runs through a wrapper that does what its `__main__` block does (import it as a
  module, call `main()`) and prints the time stamps; the module body runs once instead of twice.
- exit: the `fedplatform` command shuts Ray down and skips the interpreter's teardown (os._exit);
  Flower's process tears down normally. Both are what a user waits for.
- versions: each side its own virtualenv (Ray, torch versions in the JSON's `env`).

Prints one table and the start-up split; writes benchmarks/results/<name>.json with every run and
the medians.
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

HERE = Path(__file__).resolve().parent
PIPELINES = {"digits": HERE / "pipelines/flower_twin_digits.yaml", "overhead": HERE / "pipelines/flower_twin_overhead.yaml"}
SCRIPTS = {"digits": "flower_fedavg_digits", "overhead": "flower_overhead"}
ROUNDS_ATTR = {"digits": "ROUNDS", "overhead": "N_ROUNDS"}  # the Flower scripts' round-count constants
SAMPLED, ACTORS = 8, 2  # overhead workload: clients per round, actors (both sides)

# Runs in the Flower venv: what the scripts' __main__ block does (import as a module, so Ray pickles
# the apps by reference, then main()), plus time stamps on the system-wide monotonic clock.
FLOWER_WRAPPER = r"""
import importlib, json, sys, time
directory, stem, attr, rounds, *argv = sys.argv[1:]
sys.path.insert(0, directory)
sys.argv = [stem + ".py", *argv]
module = importlib.import_module(stem)
imported = time.perf_counter()
setattr(module, attr, int(rounds))
module.main()
s = module.STATE
print("TIMES " + json.dumps({"imports_done": imported, "ready": s["t_ready"], "first_round": s["rounds"][0]["start"],
                             "done": s["t_done"]}), flush=True)
"""
FLOWER_SETUP = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import flwr, numpy, ray, torch
import flower_overhead
print(json.dumps({"flwr": flwr.__version__, "ray": ray.__version__, "torch": torch.__version__,
                  "numpy": numpy.__version__, "python": sys.version.split()[0],
                  "burn_iters_per_s": flower_overhead.calibrate()}))
"""


def spawn(cmd: list[str], log: Path, cwd: Path, timeout: float) -> tuple[float, float, str]:
    """Run `cmd` (stderr to `log`); returns (Popen time, exit time) on perf_counter, and stdout."""
    env = dict(os.environ, RAY_ADDRESS="local")  # every process starts its own Ray
    with log.open("w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        out, _ = proc.communicate(timeout=timeout)
        t1 = time.perf_counter()
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd[:4])} ... exited with {proc.returncode}; see {log}")
    return t0, t1, out


def tagged(out: str, tag: str) -> dict:
    return json.loads(out.split(tag + " ", 1)[1].splitlines()[0])


def run_flower(workload: str, args, iters: int, log: Path, work: Path) -> dict:
    argv = ["--once"] if workload == "digits" else ["--w", str(args.work), "--iters", str(iters)]
    rounds = args.digits_rounds if workload == "digits" else args.overhead_rounds
    t0, t1, out = spawn([args.flower_python, "-c", FLOWER_WRAPPER, str(args.flower_dir), SCRIPTS[workload],
                         ROUNDS_ATTR[workload], str(rounds), *argv], log, work, args.timeout)
    r, t = tagged(out, "RESULT"), tagged(out, "TIMES")
    call = t["ready"] - r["startup_s"]  # run_simulation() was called here
    row = {
        "whole_process_s": t1 - t0,
        "startup_s": t["first_round"] - t0,
        "startup_parts_s": {"imports": t["imports_done"] - t0, "main() to run_simulation (imports ray; digits: data, seeds)": call - t["imports_done"],
                            "run_simulation to warm-up done": r["startup_s"], "of which ray.init": r["ray_init_s"],
                            "to first round": t["first_round"] - t["ready"]},
        "rounds_total_s": r["rounds_total_s"],
        "after_rounds_s": t1 - t["done"],  # teardown and exit
        "result": r,
    }
    if workload == "digits":
        row |= {"seconds_per_round": r["round_mean_s"], "final_accuracy": r["final_accuracy"]}
    else:
        row |= {"overhead_per_round_s": r["overhead_s"], "overhead_vs_measured_compute_s":
                r["overhead_vs_measured_compute_s"], "round_wall_mean_s": r["round_wall_mean_s"]}
    return row


def run_fedplatform(workload: str, args, log: Path, work: Path) -> dict:
    from mlflow.tracking import MlflowClient

    rounds = args.digits_rounds if workload == "digits" else args.overhead_rounds
    uri = f"sqlite:///{work / 'mlflow.db'}"
    t0, t1, _ = spawn([sys.executable, "-m", "fedplatform.cli", "run", str(PIPELINES[workload]), "--set",
                       f"rounds={rounds}", "--set", f"data.cache_dir={args.cache}", "--storage", str(work / "runs"),
                       "--tracking-uri", uri], log, work, args.timeout)
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("flower-twin").experiment_id])
    m = run.data.metrics
    phases = {p: m[f"time/startup/{p}_s"] for p in ("imports", "data", "ray_init", "actors", "mlflow")}
    row = {
        "run_id": run.info.run_id,
        "whole_process_s": t1 - t0,
        "startup_s": m["time/startup_s"],
        "startup_parts_s": phases | {"other": m["time/startup_s"] - sum(phases.values())},
        "rounds_total_s": m["time/rounds_total_s"],
        "seconds_per_round": m["time/rounds_total_s"] / rounds,
        "after_rounds_s": t1 - t0 - m["time/startup_s"] - m["time/rounds_total_s"],  # final logging, exit
    }
    history = lambda key: [x.value for x in sorted(client.get_metric_history(run.info.run_id, key),  # noqa: E731
                                                   key=lambda x: x.step)]
    if workload == "digits":
        row["final_accuracy"] = m["summary/final_accuracy"]
    else:
        walls, server, compute = history("time/round_s"), history("time/server_s"), history("time/client_compute_s")
        wall = statistics.fmean(walls)
        row |= {"round_wall_mean_s": wall,
                "overhead_per_round_s": wall - (SAMPLED * args.work / ACTORS + statistics.fmean(server)),
                "overhead_vs_measured_compute_s": statistics.fmean(w - c - s for w, c, s in zip(walls, compute, server))}
    return row


def flower_missing(args) -> str | None:
    if not args.flower_python or not args.flower_dir:
        return "no --flower-python / --flower-dir given"
    if not os.access(args.flower_python, os.X_OK):
        return f"--flower-python {args.flower_python} is not an executable"
    missing = [s for s in SCRIPTS.values() if not (Path(args.flower_dir) / f"{s}.py").is_file()]
    if missing:
        return f"--flower-dir {args.flower_dir} lacks {', '.join(m + '.py' for m in missing)}"
    return None


ROWS = [  # label, workload, key
    ("seconds per round (MLflow + checkpoints on)", "digits", "seconds_per_round"),
    ("start-up (process start → first round)", "digits", "startup_s"),
    ("whole process", "digits", "whole_process_s"),
    (f"20 clients, {SAMPLED}/round, {{work}} s of work each: overhead per round", "overhead", "overhead_per_round_s"),
    ("same: whole process ({rounds} rounds)", "overhead", "whole_process_s"),
]


def medians(runs: list[dict]) -> dict:
    """Per side and workload: the median of every number over the pairs (start-up parts included)."""
    out: dict = {}
    for side in ("flower", "fedplatform"):
        for workload in PIPELINES:
            rs = [r for r in runs if r["side"] == side and r["workload"] == workload]
            if not rs:
                continue
            keys = [k for k, v in rs[0].items() if isinstance(v, (int, float)) and k not in ("pair", "order")]
            med = {k: statistics.median(r[k] for r in rs) for k in keys}
            med["startup_parts_s"] = {k: statistics.median(r["startup_parts_s"][k] for r in rs)
                                      for k in rs[0]["startup_parts_s"]}
            out.setdefault(side, {})[workload] = med
    return out


def table(med: dict, args) -> str:
    lines = ["| | Flower | fedplatform | Flower / fedplatform |", "|---|---|---|---|"]
    for label, workload, key in ROWS:
        f = med.get("flower", {}).get(workload, {}).get(key)
        p = med["fedplatform"][workload][key]
        ratio = f"{f / p:.2f}" if f is not None and p > 0 else "—"
        cells = [f"{f:.3f}" if f is not None else "not run", f"{p:.3f}", ratio]
        lines.append(f"| {label.format(work=args.work, rounds=args.overhead_rounds)} | " + " | ".join(cells) + " |")
    for side, title in (("fedplatform", "fedplatform start-up, s"), ("flower", "Flower start-up, s")):
        if side not in med:
            continue
        lines += ["", f"| {title} | digits | overhead |", "|---|---|---|"]
        parts = med[side]["digits"]["startup_parts_s"]
        for part in parts:
            lines.append(f"| {part} | {parts[part]:.3f} | {med[side]['overhead']['startup_parts_s'][part]:.3f} |")
        lines.append(f"| total (process start → first round) | {med[side]['digits']['startup_s']:.3f} | "
                     f"{med[side]['overhead']['startup_s']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flower-python", help="the Flower virtualenv's python (e.g. /tmp/flwr-venv/bin/python)")
    ap.add_argument("--flower-dir", help="a copy of ../shared/bench/flower (its two scripts)")
    ap.add_argument("--pairs", type=int, default=3, help="alternating Flower/fedplatform pairs per workload")
    ap.add_argument("--digits-rounds", type=int, default=50, help="both sides (a multiple of 10: evaluation rounds)")
    ap.add_argument("--overhead-rounds", type=int, default=10, help="both sides")
    ap.add_argument("--work", type=float, default=0.05, help="overhead workload: seconds of work per client")
    ap.add_argument("--pause", type=float, default=2.0, help="seconds between processes (the last Ray exits)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds one process may take")
    ap.add_argument("--name", default="flower_twins", help="results go to benchmarks/results/<name>.json")
    args = ap.parse_args(argv)
    if args.pairs < 1:
        ap.error("--pairs must be at least 1")
    if args.digits_rounds % 10 or args.digits_rounds < 10:
        ap.error("--digits-rounds must be a multiple of 10 (both sides evaluate every 10 rounds)")
    if not sys.platform.startswith("linux"):
        ap.error("needs Linux: process start times from /proc, one monotonic clock across processes")
    skip = flower_missing(args)
    if skip:
        print(f"Flower column skipped: {skip}. Set Flower up as ../shared/bench/flower/README.md says.",
              file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="flower-twins-"))
    args.cache = work / "cache"
    print(f"logs and runs in {work}", file=sys.stderr)
    env: dict = {"fedplatform": fedplatform_env(), "cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg()}
    iters = 0
    if not skip:  # versions, and the burn calibration of its sweep (2 processes at once, before any Ray)
        _, _, out = spawn([args.flower_python, "-c", FLOWER_SETUP, str(args.flower_dir)], work / "flower-setup.log",
                          work, args.timeout)
        env["flower"] = json.loads(out.strip().splitlines()[-1])
        iters = round(args.work * env["flower"]["burn_iters_per_s"])
    # the prepared stores once, untimed: every timed fedplatform run finds them, as any run after the first
    for workload, pipeline in PIPELINES.items():
        spawn([sys.executable, "-m", "fedplatform.cli", "data", "describe", str(pipeline), "--json", "--set",
               f"data.cache_dir={args.cache}"], work / f"prepare-{workload}.log", work, args.timeout)
    runs: list[dict] = []
    for pair in range(args.pairs):
        for workload in PIPELINES:
            sides = ["flower", "fedplatform"] if pair % 2 == 0 else ["fedplatform", "flower"]
            for order, side in enumerate(s for s in sides if not (skip and s == "flower")):
                folder = work / f"{pair}-{workload}-{side}"
                folder.mkdir()
                time.sleep(args.pause)
                log = folder / "stderr.log"
                row = (run_flower(workload, args, iters, log, folder) if side == "flower"
                       else run_fedplatform(workload, args, log, folder))
                runs.append({"pair": pair, "workload": workload, "side": side, "order": order, **row})
                print(f"pair {pair} {workload:8} {side:11}: whole {row['whole_process_s']:6.2f} s, start-up "
                      f"{row['startup_s']:5.2f} s, rounds {row['rounds_total_s']:6.2f} s", file=sys.stderr, flush=True)
    med = medians(runs)
    text = table(med, args)
    print(text)
    out = HERE / "results" / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()} | {"flower_skipped": skip,
                                                                                        "flower_burn_iters": iters}
    out.write_text(json.dumps({"config": config, "env": env, "medians": med, "table": text, "runs": runs}, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def fedplatform_env() -> dict:
    import numpy
    import ray
    import torch

    import fedplatform

    return {"fedplatform": fedplatform.__version__, "ray": ray.__version__, "torch": torch.__version__,
            "numpy": numpy.__version__, "python": sys.version.split()[0]}


if __name__ == "__main__":
    sys.exit(main())
