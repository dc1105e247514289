"""Sweeps: a `tune_spaces/*.yaml` file -> a Ray Tune `Tuner` whose trials are experiments.

One trial = one `run_experiment` call (the engine behind `fedplatform run`) inside a function
trainable that reserves a placement group: bundle 0 for the trial driver and the server actor
(the driver itself needs no resources), one bundle per client actor. The engine sizes its pool
from that group, so trials never wait on each other for actors and several run side by side.
Each round is one Tune report with the run directory as checkpoint: rounds are ASHA's time unit,
`FailureConfig(max_failures)` restarts a failed trial from its last round, `--resume` restores an
interrupted sweep. MLflow: the sweep owns a parent run; every trial is a nested child run.
"""
from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedplatform.config import ConfigError, ExperimentConfig, apply_override, flatten, parse_overrides, \
    read_yaml, to_yaml, validate
from fedplatform.errors import RunFailed, UserError

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
SWEEP_STATE = "fedplatform_sweep.json"
# Pipeline paths interpreted relative to the working directory by `fedplatform run`; trials run
# in Tune's trial directories (possibly on other nodes), so they get absolute paths.
PATH_KEYS = ("data.root", "data.cache_dir", "runtime.runs_dir")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Distribution(_Spec):
    """Exactly one of: grid (every value), choice (sampled), uniform / loguniform [lo, hi],
    randint [lo, hi) (upper bound exclusive, as `tune.randint`)."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in DISTRIBUTIONS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DISTRIBUTIONS)} (got {', '.join(given) or 'none'})")
        kind = given[0]
        value = getattr(self, kind)
        if kind in ("grid", "choice") and not value:
            raise ValueError(f"{kind} needs at least one value")
        if kind in ("uniform", "loguniform", "randint") and not value[0] < value[1]:
            raise ValueError(f"{kind}: [lo, hi] needs lo < hi, got {list(value)}")
        if kind == "loguniform" and value[0] <= 0:
            raise ValueError(f"loguniform: lo must be > 0, got {value[0]}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in DISTRIBUTIONS if getattr(self, k) is not None)

    def samples(self) -> list[Any]:
        """Values that must all be valid config values (every discrete value; both bounds)."""
        v = getattr(self, self.kind)
        if self.kind == "randint":
            return [v[0], v[1] - 1]
        return list(v)

    def to_tune(self):
        from ray import tune

        v = getattr(self, self.kind)
        return {"grid": tune.grid_search, "choice": tune.choice}[self.kind](list(v)) if self.kind in (
            "grid", "choice") else getattr(tune, self.kind)(*v)


class SchedulerSpec(_Spec):
    name: Literal["fifo", "asha"] = "fifo"
    grace_period: int = Field(1, ge=1)
    """asha: rounds every trial runs before it can be stopped."""
    reduction_factor: float = Field(2.0, gt=1.0)
    """asha: keep the top 1/reduction_factor at each rung."""


class SweepSpec(_Spec):
    """A search-space file (tune_spaces/*.yaml)."""

    name: str | None = None
    """Sweep name (MLflow parent run, Tune experiment dir); default: the file's stem."""
    base: str
    """Pipeline YAML, relative to the space file."""
    set: dict[str, Any] = {}
    """Dotted overrides applied to the base pipeline for every trial."""
    space: dict[str, Distribution]
    """Dotted config key -> distribution."""
    searcher: Literal["basic", "optuna"] = "basic"
    scheduler: SchedulerSpec = SchedulerSpec()
    num_samples: int = Field(1, ge=1)
    """basic: repeats of the whole grid (random values drawn anew each time); optuna: trials."""
    max_concurrent_trials: int | Literal["auto"] = "auto"
    """auto: as many trials as there are placement groups that fit in the cluster."""
    max_failures: int = Field(1, ge=0)
    """Restarts of a failed trial, each from its last round's checkpoint."""
    metric: str = "accuracy"
    mode: Literal["max", "min"] = "max"
    seed: int | None = None
    """Searcher seed (optuna; basic random draws)."""

    @model_validator(mode="after")
    def _checks(self):
        if not self.space:
            raise ValueError("space is empty; give at least one dotted config key with a distribution")
        if isinstance(self.max_concurrent_trials, int) and self.max_concurrent_trials < 1:
            raise ValueError(f"max_concurrent_trials={self.max_concurrent_trials} must be >= 1 or 'auto'")
        if self.searcher == "optuna":
            grids = [k for k, d in self.space.items() if d.kind == "grid"]
            if grids:
                raise ValueError(f"space.{grids[0]}: grid values are not allowed with searcher: optuna "
                                 "(Optuna samples; use choice, or searcher: basic for a grid)")
        return self


@dataclass
class SweepResult:
    name: str
    parent_run_id: str
    path: Path
    rows: list[dict] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)

    def table(self) -> str:
        return format_table(self.rows, self.columns)


# ---------------------------------------------------------------------------- loading


def _spec_error(path: Path, err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        allowed = sorted(SweepSpec.model_fields) if "." not in loc else sorted(
            SchedulerSpec.model_fields if loc.startswith("scheduler.") else Distribution.model_fields)
        return f"{path}: unknown key '{loc}'; allowed keys here: {', '.join(allowed)}"
    if err["type"] == "missing":
        return f"{path}: '{loc}' is required"
    msg = err["msg"].removeprefix("Value error, ")
    if loc and not isinstance(err.get("input"), (dict, list)):
        return f"{path}: {loc}={err.get('input')!r} is invalid: {msg[0].lower()}{msg[1:]}"
    return f"{path}: {loc + ': ' if loc else ''}{msg}"


def load_spec(space_path: str | Path) -> SweepSpec:
    path = Path(space_path)
    if not path.is_file():
        raise ConfigError(f"search-space file '{space_path}' does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        raise ConfigError(f"search-space file '{space_path}' is not valid YAML") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"search-space file '{space_path}' must be a YAML mapping")
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_spec_error(path, exc.errors()[0])) from None


def _absolute_paths(raw: dict) -> None:
    flat = flatten(raw)
    for key in PATH_KEYS:
        value = flat.get(key)
        if key == "runtime.runs_dir" and value is None:
            value = "fedplatform_runs"
        if isinstance(value, str) and not value.startswith(("s3://", "gs://")):
            apply_override(raw, key, str(Path(value).expanduser().resolve()))


def absolute_uri(uri: str) -> str:
    """sqlite:///relative.db -> sqlite:////abs/relative.db: trial workers run in other directories."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    if uri.startswith("file:") or "://" not in uri:
        local = uri.removeprefix("file://").removeprefix("file:")
        return "file://" + str(Path(local).resolve())
    return uri


def build_base(spec: SweepSpec, space_path: Path, overrides: list[str]) -> tuple[dict, ExperimentConfig]:
    """The base pipeline with the space's `set` and the command line's --set applied, validated."""
    base_path = (space_path.parent / spec.base)
    if not base_path.is_file():
        raise ConfigError(f"{space_path}: base pipeline '{spec.base}' does not exist (looked at {base_path})")
    raw = read_yaml(base_path)
    for key, value in list(spec.set.items()) + parse_overrides(list(overrides)):
        apply_override(raw, key, value)
    _absolute_paths(raw)
    try:
        cfg = validate(copy.deepcopy(raw))
    except ConfigError as exc:
        raise ConfigError(f"{space_path}: base pipeline: {exc}") from None
    return raw, cfg


def check_space(spec: SweepSpec, raw: dict, space_path: Path) -> list[ExperimentConfig]:
    """Every space key must be a config key, and every value it can take must be a valid value.
    Returns the validated configs (each value on the base; each combination of discrete values)."""
    checked = []
    for key, dist in spec.space.items():
        for value in dist.samples():
            trial = copy.deepcopy(raw)
            try:
                apply_override(trial, key, value)
                checked.append(validate(trial))
            except ConfigError as exc:
                raise ConfigError(f"{space_path}: space key '{key}' (value {value!r}): {exc}") from None
    discrete = {k: d.samples() for k, d in spec.space.items() if d.kind in ("grid", "choice")}
    combos = math.prod(len(v) for v in discrete.values())
    if 1 < len(discrete) and combos <= 1000:
        for values in itertools.product(*discrete.values()):
            trial = copy.deepcopy(raw)
            for key, value in zip(discrete, values):
                apply_override(trial, key, value)
            try:
                checked.append(validate(trial))
            except ConfigError as exc:
                shown = ", ".join(f"{k}={v!r}" for k, v in zip(discrete, values))
                raise ConfigError(f"{space_path}: the combination {shown} is invalid: {exc}") from None
    if spec.scheduler.name == "asha" and validate(copy.deepcopy(raw)).runtime.eval_every != 1:
        raise ConfigError(f"{space_path}: scheduler asha compares trials every round; set runtime.eval_every=1")
    return checked


def check_trial_inputs(configs: list[ExperimentConfig], space_path: Path) -> None:
    """What a trial would only find out on its worker, checked once here: the data are where
    data.root says, and the algorithm's own checks (a known student, loadable CLIP weights)."""
    from fedplatform.algorithms import get_algorithm
    from fedplatform.data.sources import open_source

    seen = set()
    for cfg in configs:
        checks = {("data", cfg.data.model_dump_json()): (open_source, cfg.data),
                  ("algorithm", cfg.algorithm.name, cfg.model.name, cfg.clip.model, cfg.clip.pretrained):
                      (get_algorithm(cfg.algorithm.name).check, cfg)}
        for key, (check, arg) in checks.items():
            if key not in seen:
                seen.add(key)
                try:
                    check(arg)
                except UserError as exc:
                    raise UserError(f"{space_path}: {exc}") from None


# ---------------------------------------------------------------------------- resources


def _bundle(res) -> dict[str, float]:
    return {"CPU": float(res.num_cpus), "GPU": float(res.num_gpus)}


def trial_bundles(cfg: ExperimentConfig, cluster: dict) -> list[dict[str, float]]:
    """[server bundle] + [client bundle] * K; K = runtime.num_client_actors, or for 'auto'
    min(clients_per_round, client actors that fit in the cluster beside the server)."""
    rt = cfg.runtime
    server, client = _bundle(rt.server_resources), _bundle(rt.client_resources)
    if rt.num_client_actors == "auto":
        fit = [math.floor((cluster.get(r, 0.0) - server[r]) / client[r] + 1e-9) for r in ("CPU", "GPU")
               if client[r] > 0]
        k = max(1, min([cfg.clients_per_round, *fit]))
    else:
        k = rt.num_client_actors
    return [server] + [client] * k


def _need(bundles: list[dict]) -> dict[str, float]:
    return {r: sum(b.get(r, 0.0) for b in bundles) for r in ("CPU", "GPU")}


def check_trial_fits(bundles: list[dict], cluster: dict) -> None:
    need = _need(bundles)
    short = [r for r in ("CPU", "GPU") if need[r] > cluster.get(r, 0.0) + 1e-9]
    if short:
        server, client, k = bundles[0], bundles[1], len(bundles) - 1
        parts = "; ".join(
            f"{r}: {server[r]:g} (server) + {k} x {client[r]:g} (client actors) = {need[r]:g} needed, "
            f"the Ray cluster has {cluster.get(r, 0.0):g}" for r in short)
        raise UserError(f"one trial needs more than the cluster has ({parts}); lower runtime.num_client_actors "
                        "or runtime.client_resources / server_resources, or add nodes")


def concurrent_trials(bundles: list[dict], cluster: dict) -> int:
    need = _need(bundles)
    return max(1, min(math.floor(cluster.get(r, 0.0) / need[r] + 1e-9) for r in need if need[r] > 0))


def placement_group_factory(bundles: list[dict]):
    from ray.tune import PlacementGroupFactory

    # Empty head bundle: the trial driver needs no resources of its own; it runs in bundle 0
    # beside the server actor (the engine pins the server there).
    return PlacementGroupFactory([{}] + [{k: v for k, v in b.items() if v} or {"CPU": 0.01} for b in bundles],
                                 strategy="PACK")


# ---------------------------------------------------------------------------- the trial


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
    runs_dir = Path(flatten(raw)["runtime.runs_dir"]) / trial_id
    apply_override(raw, "runtime.runs_dir", str(runs_dir))
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


# ---------------------------------------------------------------------------- the sweep


def _sweep_dirs(root: Path, name: str) -> list[Path]:
    return sorted((p for p in root.glob(f"{name}-*") if (p / SWEEP_STATE).is_file()),
                  key=lambda p: p.stat().st_mtime)


def run_sweep(space_path: str | Path, overrides: list[str] = (), tracking_uri: str | None = None,
              resume: bool = False, verbose: int = 0) -> SweepResult:
    """Validate everything, then run the sweep; returns one row per trial (also logged to MLflow)."""
    import ray
    from ray import tune

    from fedplatform.experiment import ensure_ray
    from fedplatform.tracking.mlflow_run import Tracker, resolve_uri

    space_path = Path(space_path)
    spec = load_spec(space_path)
    if spec.searcher == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise UserError(f"{space_path}: searcher: optuna needs the optuna package; install it with "
                            "pip install 'fedplatform[optuna]', or use searcher: basic") from None
    name = spec.name or space_path.stem
    base, cfg = build_base(spec, space_path, list(overrides))
    check_trial_inputs([cfg, *check_space(spec, base, space_path)], space_path)
    uri = absolute_uri(resolve_uri(tracking_uri, cfg.tracking.tracking_uri))
    root = Path(cfg.runtime.runs_dir) / "sweeps"
    if resume:  # nothing to resume: one clear error before anything starts
        previous = _sweep_dirs(root, name)
        if not previous or not tune.Tuner.can_restore(str(previous[-1] / "tune")):
            raise UserError(f"--resume: no interrupted sweep named '{name}' under '{root}'")
        if not _interrupted(spec, previous[-1] / "tune"):
            raise UserError(f"--resume: the last sweep named '{name}' ({previous[-1]}) finished; "
                            "run it without --resume to start a new one")
    tracker = Tracker(uri)  # unreachable store: one clear error before anything starts
    ensure_ray()
    cluster = ray.cluster_resources()
    bundles = trial_bundles(cfg, cluster)
    check_trial_fits(bundles, cluster)
    concurrency = (concurrent_trials(bundles, cluster) if spec.max_concurrent_trials == "auto"
                   else spec.max_concurrent_trials)

    if resume:
        sweep_dir = previous[-1]
        parent_run_id = json.loads((sweep_dir / SWEEP_STATE).read_text())["parent_run_id"]
        tracker.resume(parent_run_id)
    else:
        sweep_dir = root / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        while sweep_dir.exists():
            sweep_dir = sweep_dir.with_name(sweep_dir.name + "x")
        sweep_dir.mkdir(parents=True)
        params = {f"sweep.space.{k}": json.dumps({d.kind: getattr(d, d.kind)}) for k, d in spec.space.items()}
        params.update({"sweep.searcher": spec.searcher, "sweep.scheduler": spec.scheduler.name,
                       "sweep.num_samples": spec.num_samples, "sweep.metric": spec.metric,
                       "sweep.mode": spec.mode, "sweep.max_concurrent_trials": concurrency})
        params.update({f"base.{k}": v for k, v in flatten(cfg.model_dump(mode="json")).items()})
        parent_run_id = tracker.start(cfg.tracking.experiment, f"sweep {name}", params,
                                      {"fedplatform.kind": "sweep", "sweep.name": name})
        tracker.log_text("space.yaml", space_path.read_text())
        tracker.log_text("base_config.yaml", to_yaml(cfg))
        (sweep_dir / SWEEP_STATE).write_text(json.dumps({"parent_run_id": parent_run_id,
                                                         "space": str(space_path.resolve())}))

    keys = list(spec.space)
    trainable = tune.with_parameters(run_trial, base=base, keys=keys, tracking_uri=uri,
                                     parent_run_id=parent_run_id, sweep=name)

    def resources(config: dict):
        raw = copy.deepcopy(base)
        for key in keys:
            apply_override(raw, key, config[key])
        return placement_group_factory(trial_bundles(validate(raw), cluster))

    trainable = tune.with_resources(trainable, resources)
    try:
        if resume:
            tuner = tune.Tuner.restore(str(sweep_dir / "tune"), trainable=trainable, resume_errored=True)
        else:
            tuner = tune.Tuner(trainable, param_space={k: d.to_tune() for k, d in spec.space.items()},
                               tune_config=_tune_config(spec, cfg, concurrency),
                               run_config=tune.RunConfig(
                                   name="tune", storage_path=str(sweep_dir), verbose=verbose,
                                   failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                                   checkpoint_config=tune.CheckpointConfig(num_to_keep=2)))
        grid = tuner.fit()
        interrupted = _interrupted(spec, sweep_dir / "tune")
        current = {(res.metrics or {}).get("mlflow_run_id") for res in grid}
        for run in _child_runs(tracker.client, parent_run_id):
            # Interrupted: Tune stopped these trials. Otherwise: a run no trial goes on with, left
            # RUNNING by a trial that started over (its sweep driver was killed before Tune saved it).
            if run.info.status == "RUNNING" and (interrupted or run.info.run_id not in current):
                tracker.client.set_terminated(run.info.run_id, status="KILLED")
        if interrupted:
            raise KeyboardInterrupt
        result = _summarize(grid, spec, keys, cfg, name, parent_run_id, sweep_dir, tracker)
        failed = [res.error for res in grid if res.error]
        if failed and len(failed) == len(grid):
            raise RunFailed(f"all {len(grid)} trials of sweep '{name}' failed, the first with "
                            f"{_error_line(failed[0])} (trial logs under {sweep_dir / 'tune'})")
    except BaseException as exc:
        tracker.finish(exc)
        raise
    tracker.finish()
    return result


def _error_line(error: BaseException) -> str:
    """The trial's own exception from Tune's wrapper: 'Type: first line of its message', and its
    last line when there are more (the end of a traceback it carries)."""
    cause = getattr(error, "cause", None) or error
    lines = [line.strip() for line in str(cause).strip().splitlines() if line.strip()] or [""]
    return f"{type(cause).__name__}: {lines[0]}" + (f" ... {lines[-1]}" if len(lines) > 1 else "")


def _child_runs(client, parent_run_id: str) -> list:
    experiment = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def _interrupted(spec: SweepSpec, tune_dir: Path) -> bool:
    """On Ctrl-C Tune saves its state and returns from fit() as if done (the trials it stopped read
    TERMINATED); its saved state then lacks trials, or still has some pending or running."""
    from ray.tune import ExperimentAnalysis

    total = spec.num_samples * math.prod(len(d.grid) for d in spec.space.values() if d.kind == "grid")
    saved = ExperimentAnalysis(str(tune_dir)).trials
    return len(saved) < total or any(t.status not in ("TERMINATED", "ERROR") for t in saved)


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
    return tune.TuneConfig(metric=spec.metric, mode=spec.mode, scheduler=scheduler, search_alg=search_alg,
                           num_samples=spec.num_samples, max_concurrent_trials=concurrency)


SUMMARY_METRICS = ("accuracy", "many_shot_acc", "medium_shot_acc", "few_shot_acc")


def _summarize(grid, spec: SweepSpec, keys: list[str], cfg: ExperimentConfig, name: str, parent_run_id: str,
               sweep_dir: Path, tracker) -> SweepResult:
    from fedplatform.tracking.plots import plot_sweep_groups, plot_sweep_metric

    rows = []
    for res in grid:
        m = res.metrics or {}
        rounds_run = int(m.get("round", 0) or 0)
        algorithm = res.config.get("algorithm.name", cfg.algorithm.name)
        max_rounds = int(res.config.get("rounds", cfg.rounds))
        status = "error" if res.error else ("stopped early" if rounds_run < max_rounds else "finished")
        row = {"trial": m.get("trial_id", os.path.basename(str(res.path))), "algorithm": algorithm}
        row.update({k: res.config.get(k) for k in keys if k != "algorithm.name"})
        row.update({"status": status, "rounds_run": rounds_run})  # a swept `rounds` keeps its column
        row.update({k: m.get(k) for k in SUMMARY_METRICS if k in m})
        row["mlflow_run_id"] = m.get("mlflow_run_id")
        rows.append(row)
        if row["mlflow_run_id"] and status == "stopped early":
            # Tune stops the trial's actor; its run never reaches run_experiment's end.
            tracker.client.set_tag(row["mlflow_run_id"], "sweep.stopped_early", f"after round {rounds_run}")
            tracker.client.set_terminated(row["mlflow_run_id"], status="KILLED")
    rows.sort(key=lambda r: r["trial"])
    columns = list(dict.fromkeys(k for r in rows for k in r))
    table = to_csv(rows, columns)
    (sweep_dir / "sweep_summary.csv").write_text(table)
    tracker.log_text("sweep_summary.csv", table)
    plots = sweep_dir / "plots"
    plots.mkdir(exist_ok=True)
    done = [r for r in rows if r.get("accuracy") is not None]
    for key in keys:
        if key == "algorithm.name":
            continue
        path = plots / f"accuracy_vs_{key.replace('.', '_')}.png"
        plot_sweep_metric(done, key, "accuracy", path)
        tracker.log_file(path)
    if any(r.get("many_shot_acc") is not None for r in done):
        path = plots / "shot_accuracy_per_trial.png"
        plot_sweep_groups(done, ("many_shot_acc", "medium_shot_acc", "few_shot_acc"), path)
        tracker.log_file(path)
    best = max(done, key=lambda r: r["accuracy"] * (1 if spec.mode == "max" else -1), default=None)
    if best is not None:
        tracker.log_metrics(0, {"best_accuracy": best["accuracy"]})
        tracker.set_tags({"sweep.best_trial": str(best["trial"])})
    return SweepResult(name, parent_run_id, sweep_dir, rows, columns)


def to_csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def format_table(rows: list[dict], columns: list[str]) -> str:
    shown = [c for c in columns if c != "mlflow_run_id"]

    def cell(v):
        if v is None:
            return "-"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    cells = [[cell(r.get(c)) for c in shown] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(shown)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(shown, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
