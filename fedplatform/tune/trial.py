"""One trial: a function trainable that runs one experiment and reports each round to Tune,
with the run directory as its checkpoint; a restarted trial goes on from its last round."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

from fedplatform.config import apply_override, flatten, validate


def _trial_name(config: dict, keys: list[str]) -> str:
    return " ".join(f"{k.rsplit('.', 1)[-1]}={config[k]:.4g}" if isinstance(config[k], float)
                    else f"{k.rsplit('.', 1)[-1]}={config[k]}" for k in keys)


def _saved_round(run_dir: Path) -> int:
    return int(json.loads((run_dir / "checkpoint.json").read_text())["round"])


def _resume_dir(runs_dir: Path) -> tuple[Path | None, bool]:
    """Where a (re)started trial goes on from, and whether Tune has seen that round: the latest of
    Tune's checkpoint (copied into `runs_dir`) and the run directories an earlier attempt left in
    `runs_dir` on this node. Tune's copy can lag the run directory (it is taken at report time and
    an interrupt can lose the last reports), or be missing altogether; the run directory then
    still holds the rounds it checkpointed, in the same MLflow run."""
    from ray import tune

    tuned, tuned_round = None, -1
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            tuned_round = _saved_round(Path(d))
            tuned = runs_dir / json.loads((Path(d) / "checkpoint.json").read_text())["run_id"]
            if not (tuned / "checkpoint.json").is_file() or _saved_round(tuned) < tuned_round:
                shutil.rmtree(tuned, ignore_errors=True)
                shutil.copytree(d, tuned)
    local = [p.parent for p in runs_dir.glob("*/checkpoint.json")]
    if not local:
        return None, False
    best = max(local, key=lambda p: (_saved_round(p), p == tuned, p.stat().st_mtime))
    return best, best == tuned and _saved_round(best) == tuned_round


def run_trial(config: dict, *, base: dict, keys: list[str], tracking_uri: str, parent_run_id: str,
              sweep: str) -> None:
    """Tune function trainable: one experiment; one report (with checkpoint) per round."""
    from ray import tune

    from fedplatform.experiment import run_experiment
    from fedplatform.runtime.checkpoint import load

    trial_id = tune.get_context().get_trial_id()
    raw = copy.deepcopy(base)
    for key in keys:
        apply_override(raw, key, config[key])
    runs_dir = Path(flatten(raw)["runtime.storage"]) / trial_id
    apply_override(raw, "runtime.storage", str(runs_dir))
    apply_override(raw, "tracking.run_name", f"{sweep} {trial_id} {_trial_name(config, keys)}".strip())
    cfg = validate(raw)

    def report(row: dict, run_dir: Path) -> None:
        metrics = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        metrics["mlflow_run_id"] = run_dir.name
        ckpt = tune.Checkpoint.from_directory(str(run_dir)) if _saved_round(run_dir) == row["round"] else None
        tune.report(metrics, checkpoint=ckpt)

    resume, tune_has_it = _resume_dir(runs_dir)
    if resume is not None and _saved_round(resume) >= cfg.rounds:
        # It finished before the sweep stopped. Tune saw that (reporting again would count a
        # round twice) or not (its last report is due now).
        if not tune_has_it:
            report(load(resume)[0].history[-1], resume)
        return

    def on_round(row: dict, run_dir: Path) -> None:
        # The last round is reported after run_experiment returns: a scheduler that stops the trial
        # on that report (ASHA at max_t) must not cut off the final artifacts and the FINISHED status.
        if row["round"] < cfg.rounds:
            report(row, run_dir)

    result = run_experiment(cfg, tracking_uri=tracking_uri, resume=str(resume) if resume else None,
                            parent_run_id=parent_run_id, on_round=on_round, progress=False)
    report(result.history[-1], result.run_dir)
