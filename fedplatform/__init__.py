"""fedplatform: CLIP-guided federated learning on heterogeneous and long-tailed data, on Ray.

The public Python API (what the `fedplatform` command runs; each import is deferred, so
`import fedplatform` stays cheap):

    cfg = fedplatform.load_config("pipelines/quickstart.yaml", ["rounds=2"])
    result = fedplatform.run(cfg)                  # RunResult: run_id, run_dir, history, summary
    model = fedplatform.load_model(result.run_id)  # torch module: uint8 images [N, H, W, C] -> logits
    fedplatform.describe(cfg)                      # class counts and every client's histogram
    fedplatform.sweep("tune_spaces/quickstart_sweep.yaml")
    with fedplatform.reuse_actors():               # many runs in one process: each takes the last one's actors
        results = [fedplatform.run(cfg, ...) for cfg in cfgs]

Plug-in algorithms and models: `register_algorithm`, `register_model` (see `fedplatform.plugins`).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

__version__ = "0.1.0"

if TYPE_CHECKING:
    from fedplatform.config import ExperimentConfig
    from fedplatform.experiment import RunResult
    from fedplatform.tracking.mlflow_model import Predictor
    from fedplatform.tune.summary import SweepResult

__all__ = ["__version__", "describe", "load_config", "load_model", "register_algorithm", "register_model",
           "reuse_actors", "run", "sweep"]


def load_config(config: str | Path | dict | ExperimentConfig, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """A validated config from a pipeline YAML path, a dict of sections or a config, with
    `KEY=VALUE` overrides (`["rounds=2", "algorithm.lr=0.05"]`, as `--set`) applied.
    Raises `fedplatform.config.ConfigError` (one line naming the key) on a bad value."""
    import copy

    from fedplatform.config import ExperimentConfig, apply_override, load_config as from_file, parse_overrides, \
        validate

    if isinstance(config, (str, Path)):
        return from_file(config, list(overrides))
    raw = config.model_dump(mode="json") if isinstance(config, ExperimentConfig) else copy.deepcopy(config)
    for key, value in parse_overrides(list(overrides)):
        apply_override(raw, key, value)
    return validate(raw)


def run(config: str | Path | dict | ExperimentConfig, *, tracking_uri: str | None = None, resume: str | None = None,
        ray_address: str | None = None, progress: bool = False) -> RunResult:
    """Train one experiment on Ray (connecting to `ray_address`, $RAY_ADDRESS, or a local Ray of its
    own unless Ray is already initialised), tracked in MLflow; `resume` continues a run (its id or
    run directory). Returns the RunResult: run_id, run_dir, history (one dict per round), summary."""
    from fedplatform.experiment import run_experiment

    return run_experiment(load_config(config), tracking_uri=tracking_uri, resume=resume, ray_address=ray_address,
                          progress=progress)


def reuse_actors():
    """A context manager for many runs in one process: each run inside it leaves its idle server
    and client actors to the next, which sets them up again for its own config instead of starting
    new Ray workers that import torch (the same numbers; a sweep's trials do this by themselves).
    The actors keep their CPUs and GPUs while the block lasts and are killed when it ends."""
    from fedplatform.runtime.engine import reuse_actors

    return reuse_actors()


def sweep(space: str | Path, overrides: Iterable[str] = (), *, tracking_uri: str | None = None,
          resume: bool = False) -> SweepResult:
    """Run a Ray Tune sweep over a search-space YAML (`tune_spaces/*.yaml`), `overrides` applied to
    every trial's base pipeline; returns its SweepResult (rows, best trial, MLflow parent run id)."""
    from fedplatform.tune import run_sweep

    return run_sweep(space, list(overrides), tracking_uri=tracking_uri, resume=resume)


def describe(config: str | Path | dict | ExperimentConfig, *, rebuild: bool = False) -> dict[str, Any]:
    """Prepare the config's federated dataset (cached) and describe it: dataset, class names, train
    and test class counts, every client's train label histogram (`fedplatform data describe --json`)."""
    from fedplatform.data import prepare

    return prepare(load_config(config), rebuild=rebuild).describe()


def load_model(run: str | Path, tracking_uri: str | None = None) -> Predictor:
    """The trained model of a finished run as a torch module in eval mode: uint8 images [N, H, W, C]
    -> logits [N, C] (normalisation, the student, the head the run's accuracy was measured with; FedCLIP:
    its frozen CLIP loaded again from the hub tag, checkpoint or seed the run used, and the adapter);
    `.spec` holds class names and input shape, `.probabilities(images)` the softmax. `run`: an MLflow
    run id, a `runs:/` or `models:/` URI, or a local copy of the logged model's directory."""
    from fedplatform.tracking.mlflow_model import load_predictor

    return load_predictor(str(run), tracking_uri)


def register_algorithm(name: str, config: type | None = None):
    """Class decorator: register a plug-in `Algorithm` subclass as `name`, its settings validated by
    the pydantic model `config` (see fedplatform.algorithms.base)."""
    from fedplatform.algorithms.base import register_algorithm as register

    return register(name, config)


def register_model(name: str):
    """Decorator: register a student builder `fn(num_classes, in_channels, image_size) -> nn.Module`."""
    from fedplatform.models.backbones import register_model as register

    return register(name)
