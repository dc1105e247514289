"""One trial: a function trainable that runs one experiment and reports each round to Tune,
with a checkpoint; a restarted trial goes on from its last round.

With a local `runtime.storage` the Tune checkpoint is the whole run directory (Tune copies it to
its storage, so a trial restarted on another node gets it back). With a URI storage the run
directory is already on shared storage that every node (and a new head) reads; the Tune checkpoint
is then only its `checkpoint.json`, the record of which round Tune has seen.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from fedplatform import storage
from fedplatform.config import apply_override, flatten, validate
from fedplatform.runtime.checkpoint import CHECKPOINT


def trial_name(config: dict, keys: list[str]) -> str:
    return " ".join(f"{k.rsplit('.', 1)[-1]}={config[k]:.4g}" if isinstance(config[k], float)
                    else f"{k.rsplit('.', 1)[-1]}={config[k]}" for k in keys)


def _saved_round(run_dir: str) -> int:
    return int(json.loads(storage.read_bytes(storage.join(run_dir, CHECKPOINT)))["round"])


def _resume_dir(runs_dir: str) -> tuple[str | None, bool]:
    """Where a (re)started trial goes on from, and whether Tune has seen that round: the latest of
    Tune's checkpoint and the run directories an earlier attempt left in `runs_dir` (on this node,
    or on shared storage). Tune's checkpoint can lag the run directory (it is taken at report time
    and an interrupt can lose the last reports), or be missing altogether; the run directory then
    still holds the rounds it checkpointed, in the same MLflow run. On local storage Tune's copy is
    restored into `runs_dir` where that is missing or behind (a fresh node)."""
    from ray import tune

    runs_dir = str(runs_dir)
    tuned, tuned_round = None, -1
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            saved = json.loads((Path(d) / CHECKPOINT).read_text())
            tuned_round, tuned = int(saved["round"]), storage.join(runs_dir, saved["run_id"])
            if not storage.is_uri(runs_dir) and (not os.path.isfile(os.path.join(tuned, CHECKPOINT))
                                                 or _saved_round(tuned) < tuned_round):
                shutil.rmtree(tuned, ignore_errors=True)
                shutil.copytree(d, tuned)
    found = [storage.join(runs_dir, name) for name in storage.list_dir(runs_dir)
             if storage.is_file(storage.join(runs_dir, name, CHECKPOINT))]
    if not found:
        return None, False
    best = max(found, key=lambda p: (_saved_round(p), p == tuned, storage.mtime(storage.join(p, CHECKPOINT))))
    return best, best == tuned and _saved_round(best) == tuned_round


@contextlib.contextmanager
def _tune_checkpoint(run_dir: str):
    """The Tune checkpoint of a run directory: the directory itself when local, else a local
    copy of its `checkpoint.json` (Tune uploads it during `tune.report`)."""
    from ray import tune

    if not storage.is_uri(run_dir):
        yield tune.Checkpoint.from_directory(run_dir)
        return
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / CHECKPOINT).write_bytes(storage.read_bytes(storage.join(run_dir, CHECKPOINT)))
        yield tune.Checkpoint.from_directory(tmp)


def run_trial(config: dict, *, base: dict, keys: list[str], tracking_uri: str, parent_run_id: str,
              sweep: str, env: dict[str, str]) -> None:
    """Tune function trainable: one experiment; one report (with checkpoint) per round. `env` is
    set before the run imports anything that reads it (MLflow's logging level)."""
    os.environ.update(env)
    from ray import tune

    from fedplatform.experiment import run_experiment
    from fedplatform.runtime.checkpoint import load

    # Tune logs each checkpoint it takes (one per round) at INFO, which reaches the sweep's terminal
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    trial_id = tune.get_context().get_trial_id()
    raw = copy.deepcopy(base)
    for key in keys:
        apply_override(raw, key, config[key])
    # The trial's runs live under <storage>/<trial id>; runtime.storage itself stays the sweep's,
    # so data published to <storage>/data serve every trial.
    runs_dir = storage.join(flatten(raw)["runtime.storage"], trial_id)
    apply_override(raw, "tracking.run_name", f"{sweep} {trial_id} {trial_name(config, keys)}".strip())
    cfg = validate(raw)

    def report(row: dict, run_dir: str) -> None:
        metrics = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        metrics["mlflow_run_id"] = os.path.basename(run_dir.rstrip("/"))
        if _saved_round(run_dir) != row["round"]:
            tune.report(metrics)
            return
        with _tune_checkpoint(run_dir) as checkpoint:
            tune.report(metrics, checkpoint=checkpoint)

    resume, tune_has_it = _resume_dir(runs_dir)
    if resume is not None and _saved_round(resume) >= cfg.rounds:
        # It finished before the sweep stopped. Tune saw that (reporting again would count a
        # round twice) or not (its last report is due now).
        if not tune_has_it:
            report(load(resume)[0].history[-1], resume)
        return

    def on_round(row: dict, run_dir: str) -> None:
        # The last round is reported after run_experiment returns: a scheduler that stops the trial
        # on that report (ASHA at max_t) must not cut off the final artifacts and the FINISHED status.
        if row["round"] < cfg.rounds:
            report(row, run_dir)

    # replicas of one configuration over seeds share this tag: what `fedplatform report` groups by
    tags = {"sweep.name": sweep, "sweep.config": trial_name(config, [k for k in keys if k != "seed"]) or "base"}
    result = run_experiment(cfg, tracking_uri=tracking_uri, resume=resume, parent_run_id=parent_run_id,
                            on_round=on_round, progress=False, runs_under=runs_dir, tags=tags)
    report(result.history[-1], result.run_dir)
