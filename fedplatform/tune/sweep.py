"""Sweeps: a `tune_spaces/*.yaml` file -> a Ray Tune `Tuner` whose trials are experiments.

One trial = one `run_experiment` call (the engine behind `fedplatform run`) inside a function
trainable that reserves a placement group: bundle 0 for the trial driver and the server actor
(the driver itself needs no resources), one bundle per client actor. The engine sizes its pool
from that group, so trials never wait on each other for actors and several run side by side.
Each round is one Tune report with the run directory as checkpoint: rounds are ASHA's time unit,
`FailureConfig(max_failures)` restarts a failed trial from its last round, `--resume` restores an
interrupted sweep. MLflow: the sweep owns a parent run; every trial is a nested child run.

The parts live beside this module: `space` (the space file and the checks before anything
starts), `resources` (a trial's placement group), `trial` (the trainable), `summary` (the table).
"""
from __future__ import annotations

import copy
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fedplatform import storage
from fedplatform.config import ExperimentConfig, apply_override, flatten, to_yaml, validate
from fedplatform.errors import RunFailed, UserError
from fedplatform.runtime.resources import Cluster, release_request, wait_for_resources
from fedplatform.tracking import MLFLOW_QUIET
from fedplatform.tune.resources import check_trial_fits, concurrent_trials, placement_group_factory, trial_bundles
from fedplatform.tune.space import NAME_PATTERN, SweepSpec, build_base, check_space, check_trial_inputs, load_spec
from fedplatform.tune.summary import SweepResult, summarize
from fedplatform.tune.trial import run_trial

SWEEP_STATE = "fedplatform_sweep.json"


def _sweep_dirs(root: str, name: str) -> list[str]:
    """The sweeps of this name under `root`, oldest first: their names end in the start time
    (`<name>-YYYYmmdd-HHMMSS`, then an `x` per clash), which sorts the same on any storage."""
    pattern = re.compile(re.escape(name) + r"-\d{8}-\d{6}x*")
    return [storage.join(root, d) for d in storage.list_dir(root)
            if pattern.fullmatch(d) and storage.is_file(storage.join(root, d, SWEEP_STATE))]


def run_sweep(space_path: str | Path, overrides: list[str] = (), tracking_uri: str | None = None,
              resume: bool = False, verbose: int = 0) -> SweepResult:
    """Validate everything, then run the sweep; returns one row per trial (also logged to MLflow)."""
    from ray import tune

    from fedplatform.experiment import ensure_ray
    from fedplatform.tracking.mlflow_run import Tracker, absolute_uri, check_tracking_uri, resolve_uri
    from fedplatform.tune.progress import TrialLines, error_line

    space_path = Path(space_path)
    spec = load_spec(space_path)
    if spec.searcher == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise UserError(f"{space_path}: searcher: optuna needs the optuna package; install it with "
                            "pip install 'fedplatform[optuna]', or use searcher: basic") from None
    name = spec.name or space_path.stem
    if not re.match(NAME_PATTERN, name):
        raise UserError(f"sweep name {name!r} (the file's stem) cannot be a folder name; set name: with letters, "
                        "digits, '_', '.' and '-' in the space file")
    base, cfg = build_base(spec, space_path, list(overrides))
    check_trial_inputs([cfg, *check_space(spec, base, space_path)], space_path)
    uri = absolute_uri(resolve_uri(tracking_uri, cfg.tracking.tracking_uri))
    storage.check_writable(cfg.runtime.storage)
    root = storage.join(cfg.runtime.storage, "sweeps")
    if resume:  # nothing to resume: one clear error before anything starts
        previous = _sweep_dirs(root, name)
        if not previous or not tune.Tuner.can_restore(storage.join(previous[-1], "tune")):
            raise UserError(f"--resume: no interrupted sweep named '{name}' under '{root}'")
        if not _interrupted(spec, storage.join(previous[-1], "tune")):
            raise UserError(f"--resume: the last sweep named '{name}' ({previous[-1]}) finished; "
                            "run it without --resume to start a new one")
    check_tracking_uri(uri)  # unreachable store: one clear error before anything starts (creates nothing)
    with ThreadPoolExecutor(1) as background:
        # MLflow's import and store set-up overlap Ray's start-up, as in a run
        tracker_ready = background.submit(Tracker, uri, storage=cfg.runtime.storage)
        try:
            ensure_ray()
            cluster = Cluster.observe()
            bundles = trial_bundles(cfg, cluster)
            check_trial_fits(cfg, bundles, cluster)
            concurrency = (concurrent_trials(bundles, cluster) if spec.max_concurrent_trials == "auto"
                           else spec.max_concurrent_trials)
            # An autoscaling cluster adds nodes for the first trial now (or says clearly that it
            # cannot); Tune's pending placement groups ask for the rest.
            if wait_for_resources(bundles, cluster, cfg.runtime.wait_for_resources_s, "one trial"):
                release_request()
        except BaseException:
            tracker_ready.cancel()
            raise
        tracker = tracker_ready.result()

    if resume:
        sweep_dir = previous[-1]
        parent_run_id = json.loads(storage.read_bytes(storage.join(sweep_dir, SWEEP_STATE)))["parent_run_id"]
        tracker.resume(parent_run_id)
    else:
        sweep_dir = storage.join(root, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
        while storage.exists(sweep_dir):
            sweep_dir += "x"
        params = {f"sweep.space.{k}": json.dumps({d.kind: getattr(d, d.kind)}) for k, d in spec.space.items()}
        params.update({"sweep.searcher": spec.searcher, "sweep.scheduler": spec.scheduler.name,
                       "sweep.num_samples": spec.num_samples, "sweep.metric": spec.metric,
                       "sweep.mode": spec.mode, "sweep.max_concurrent_trials": concurrency})
        if spec.seeds:
            params["sweep.seeds"] = json.dumps(spec.seeds)
        params.update({f"base.{k}": v for k, v in flatten(cfg.model_dump(mode="json")).items()})
        parent_run_id = tracker.start(cfg.tracking.experiment, f"sweep {name}", params,
                                      {"fedplatform.kind": "sweep", "sweep.name": name})
        tracker.log_text("space.yaml", space_path.read_text())
        tracker.log_text("base_config.yaml", to_yaml(cfg))
        storage.write_bytes(storage.join(sweep_dir, SWEEP_STATE),
                            json.dumps({"parent_run_id": parent_run_id, "space": str(space_path.resolve()),
                                       "tracking_uri": uri}).encode())

    keys = list(spec.space) + (["seed"] if spec.seeds else [])
    # The trials' MLflow output: quiet, unless this process set its own (the CLI's --debug does).
    mlflow_env = {key: os.environ.get(key, value) for key, value in MLFLOW_QUIET.items()}
    trainable = tune.with_parameters(run_trial, base=base, keys=keys, tracking_uri=uri,
                                     parent_run_id=parent_run_id, sweep=name, env=mlflow_env)

    def resources(config: dict):
        raw = copy.deepcopy(base)
        for key in keys:
            apply_override(raw, key, config[key])
        return placement_group_factory(trial_bundles(validate(raw), cluster))

    trainable = tune.with_resources(trainable, resources)
    # num_to_keep (below) makes Tune save its state whenever a trial checkpointed twice since the
    # last save, and warn when that happens often: it does with short rounds, by design here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    try:
        if resume:
            tuner = tune.Tuner.restore(storage.join(sweep_dir, "tune"), trainable=trainable, resume_errored=True)
        else:
            tuner = tune.Tuner(trainable, param_space=spec.param_space(),
                               tune_config=_tune_config(spec, cfg, concurrency),
                               run_config=tune.RunConfig(
                                   name="tune", storage_path=sweep_dir, verbose=verbose,
                                   failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                                   callbacks=[TrialLines(keys, cfg.rounds, spec.metric, spec.mode, spec.trials)],
                                   checkpoint_config=tune.CheckpointConfig(num_to_keep=2)))
        grid = tuner.fit()
        interrupted = _interrupted(spec, storage.join(sweep_dir, "tune"))
        current = {(res.metrics or {}).get("mlflow_run_id") for res in grid}
        for run in _child_runs(tracker.client, parent_run_id):
            # Interrupted: Tune stopped these trials. Otherwise: a run no trial goes on with, left
            # RUNNING by a trial that started over (its sweep driver was killed before Tune saved it).
            if run.info.status == "RUNNING" and (interrupted or run.info.run_id not in current):
                tracker.client.set_terminated(run.info.run_id, status="KILLED")
        if interrupted:
            raise KeyboardInterrupt
        result = summarize(grid, spec, keys, cfg, name, parent_run_id, sweep_dir, tracker)
        failed = [res.error for res in grid if res.error]
        if failed and len(failed) == len(grid):
            which = f"all {len(grid)} trials of sweep '{name}' failed, the first" if len(grid) > 1 else \
                f"the one trial of sweep '{name}' failed"
            raise RunFailed(f"{which} with {error_line(failed[0])} (trial logs under "
                            f"{storage.join(sweep_dir, 'tune')})")
    except BaseException as exc:
        tracker.finish(exc)
        raise
    tracker.finish()
    return result


def _child_runs(client, parent_run_id: str) -> list:
    experiment = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def _interrupted(spec: SweepSpec, tune_dir: str) -> bool:
    """On Ctrl-C Tune saves its state and returns from fit() as if done (the trials it stopped read
    TERMINATED); its saved state then lacks trials, or still has some pending or running."""
    from ray.tune import ExperimentAnalysis

    saved = ExperimentAnalysis(tune_dir).trials
    return len(saved) < spec.trials or any(t.status not in ("TERMINATED", "ERROR") for t in saved)


def _tune_config(spec: SweepSpec, cfg: ExperimentConfig, concurrency: int):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if spec.scheduler.name == "asha":
        scheduler = ASHAScheduler(time_attr="round", max_t=cfg.rounds,
                                  grace_period=min(spec.scheduler.grace_period, cfg.rounds),
                                  reduction_factor=spec.scheduler.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    search_alg = None
    if spec.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=spec.seed)
    elif spec.seed is not None:
        from ray.tune.search import BasicVariantGenerator

        search_alg = BasicVariantGenerator(random_state=spec.seed)
    # reuse_actors: a trial starts in the process of one that ended (same placement group shape), so
    # it does not import torch, MLflow and the package again (quickstart sweep: 30.2 -> 21.7 s)
    return tune.TuneConfig(metric=spec.metric, mode=spec.mode, scheduler=scheduler, search_alg=search_alg,
                           num_samples=spec.num_samples, max_concurrent_trials=concurrency, reuse_actors=True)
