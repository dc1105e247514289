"""Search-space files (tune_spaces/*.yaml): the spec, its loading, and every check a sweep runs
before anything starts (each value a valid config value, the data and CLIP weights reachable)."""
from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedplatform import storage
from fedplatform.config import ConfigError, ExperimentConfig, apply_override, default_storage, flatten, \
    load_yaml_mapping, parse_overrides, read_yaml, shorten, validate
from fedplatform.errors import UserError

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
# Pipeline paths interpreted relative to the working directory by `fedplatform run`; trials run
# in Tune's trial directories (possibly on other nodes), so they get absolute paths.
PATH_KEYS = ("data.root", "data.cache_dir", "runtime.storage")


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"
"""A sweep name becomes a folder name: letters, digits, '_', '.', '-', at most 100, no separators or '..'."""
REPORTED_METRICS = ("accuracy", "loss", "many_shot_acc", "medium_shot_acc", "few_shot_acc", "train_loss",
                    "val_accuracy", "in_federation_acc", "val_gate_entropy", "gate_entropy", "adapter_weight_norm",
                    "federated_feature_norm", "round")
"""What a round reports to Tune (algorithm-dependent ones included); also any time/, comm/, memory/,
domain/ or fedavg_head_ metric."""
REPORTED_PREFIXES = ("time/", "comm/", "memory/", "domain/", "fedavg_head_")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


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
        if kind in ("grid", "choice") and any(isinstance(v, float) and not math.isfinite(v) for v in value):
            raise ValueError(f"{kind}: values must be finite numbers, got {value}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in DISTRIBUTIONS if getattr(self, k) is not None)

    def samples(self) -> list[Any]:
        """Values that must all be valid config values (every discrete value; both bounds)."""
        v = getattr(self, self.kind)
        if self.kind == "randint":
            return [v[0], v[1] - 1]
        if self.kind in ("uniform", "loguniform"):  # and a fractional draw: an integer key takes none
            return [float(v[0]), math.nextafter(float(v[0]), v[1]), float(v[1])]
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

    name: str | None = Field(None, pattern=NAME_PATTERN)
    """Sweep name (MLflow parent run, Tune experiment dir); default: the file's stem. Letters,
    digits, '_', '.', '-' (it becomes a folder name)."""
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
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    """Searcher seed (optuna; basic random draws)."""
    seeds: list[int] | None = None
    """Run seeds: every configuration of the space runs once per seed (replicas, each with that
    `seed`), so `fedplatform report` can give mean and std over seeds. Grid spaces, FIFO only."""

    @model_validator(mode="after")
    def _checks(self):
        if not self.space:
            raise ValueError("space is empty; give at least one dotted config key with a distribution")
        if self.metric not in REPORTED_METRICS and not self.metric.startswith(REPORTED_PREFIXES):
            raise ValueError(f"metric={shorten(self.metric, 60)} is not a metric the runs report; use one of "
                             f"{', '.join(REPORTED_METRICS)} (or a time/, comm/, memory/, domain/ metric)")
        if isinstance(self.max_concurrent_trials, int) and self.max_concurrent_trials < 1:
            raise ValueError(f"max_concurrent_trials={self.max_concurrent_trials} must be >= 1 or 'auto'")
        if self.seeds is not None:
            self._check_seeds()
        if self.searcher == "optuna":
            grids = [k for k, d in self.space.items() if d.kind == "grid"]
            if grids:
                raise ValueError(f"space.{grids[0]}: grid values are not allowed with searcher: optuna "
                                 "(Optuna samples; use choice, or searcher: basic for a grid)")
        return self

    def _check_seeds(self) -> None:
        seeds = self.seeds
        if not seeds or len(set(seeds)) != len(seeds) or not all(0 <= s <= 2**32 - 1 for s in seeds):
            raise ValueError(f"seeds: {seeds} must be a non-empty list of distinct run seeds in 0..2**32-1")
        if "seed" in self.space or "seed" in self.set:
            raise ValueError("give the run seeds either as seeds: or as space.seed / set.seed, not both")
        sampled = [f"space.{k}: {d.kind}" for k, d in self.space.items() if d.kind != "grid"]
        if self.searcher != "basic" or sampled:
            got = f"searcher: {self.searcher}" if self.searcher != "basic" else sampled[0]
            raise ValueError(f"seeds need searcher: basic over grid values only, so that every seed runs the same "
                             f"configurations (got {got}); list the values to compare as grid")
        if self.scheduler.name != "fifo":
            raise ValueError(f"seeds need scheduler: fifo (got {self.scheduler.name}): an early-stopping scheduler "
                             "would cut some seeds of a configuration short and not others")
        if self.num_samples != 1:
            raise ValueError(f"num_samples={self.num_samples} with seeds would run each (configuration, seed) "
                             "more than once; leave num_samples at 1")

    @property
    def trials(self) -> int:
        """Trials a grid sweep runs: num_samples x every grid combination x seeds."""
        return (self.num_samples * math.prod(len(d.grid) for d in self.space.values() if d.kind == "grid")
                * len(self.seeds or [None]))

    def param_space(self) -> dict:
        """Tune's param_space: the distributions, and the run seeds as one more grid axis."""
        from ray import tune

        space = {k: d.to_tune() for k, d in self.space.items()}
        if self.seeds:
            space["seed"] = tune.grid_search(list(self.seeds))
        return space


def _spec_error(path: Path, err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        allowed = sorted(SweepSpec.model_fields) if "." not in loc else sorted(
            SchedulerSpec.model_fields if loc.startswith("scheduler.") else Distribution.model_fields)
        return f"{path}: unknown key '{loc}'; allowed keys here: {', '.join(allowed)}"
    if err["type"] == "missing":
        return f"{path}: '{loc}' is required"
    msg = err["msg"].removeprefix("Value error, ")
    if loc == "name" and err["type"] == "string_pattern_mismatch":
        return (f"{path}: name={shorten(err.get('input'), 60)} cannot be a folder name; use letters, digits, "
                "'_', '.' and '-' (at most 100, starting with a letter or digit; no '/' or '..')")
    if loc and not isinstance(err.get("input"), (dict, list)):
        return f"{path}: {loc}={shorten(err.get('input'))} is invalid: {msg[0].lower()}{msg[1:]}"
    return f"{path}: {loc + ': ' if loc else ''}{msg}"


def load_spec(space_path: str | Path) -> SweepSpec:
    path = Path(space_path)
    raw = load_yaml_mapping(path, "search-space file")
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_spec_error(path, exc.errors()[0])) from None


def _absolute_paths(raw: dict) -> None:
    flat = flatten(raw)
    for key in PATH_KEYS:
        value = flat.get(key)
        if key == "runtime.storage" and value is None:
            value = default_storage()
        if isinstance(value, str) and not storage.is_uri(value):
            apply_override(raw, key, str(Path(value).expanduser().resolve()))


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
