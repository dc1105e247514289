"""The algorithm contract: explicit state plus five methods the engine calls.

The engine runs, checkpoints and resumes any algorithm without knowing what it does:

    state   = algo.init_server_state(seed)                     # server, once
    payload = algo.broadcast(state)                            # server, every round
    update  = algo.client_update(payload, data, generator)     # client actor, per sampled client
    state   = algo.aggregate(state, updates, round)            # server, updates sorted by client id
                                                               # (or aggregate_start/add/finish, streamed)
    metrics = algo.evaluate(state, test)                       # server, on schedule (global test set)

State, payload and update tensors are flat `dict[str, Tensor]` on the CPU (safetensors
checkpoints, Ray object store). One instance lives per actor for the whole run and may keep its
networks on `ctx.device` between calls; its results must depend only on the arguments: all
randomness in `client_update` comes from `generator`, and `evaluate` is deterministic.
"""
from __future__ import annotations

import abc
import importlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedplatform.config import ExperimentConfig
from fedplatform.errors import UserError

EVAL_BATCH_SIZE = 500
"""Reference test batch size (`batch_size_test`)."""
MANY_SHOT_MIN = 100
FEW_SHOT_MAX = 20
"""Long-tail groups by global train count: many > 100, medium 20..100, few < 20."""

State = dict[str, torch.Tensor]


@dataclass
class Context:
    """What an algorithm needs that is not state; identical on every actor."""

    cfg: ExperimentConfig
    num_classes: int
    class_names: list[str]
    image_shape: tuple[int, int, int]
    """(H, W, C) of the uint8 images."""
    norm_mean: tuple[float, ...]
    norm_std: tuple[float, ...]
    train_class_counts: np.ndarray
    """[C] global training counts, for the many / medium / few-shot groups."""
    device: torch.device
    dataset: Any = None
    """The memory-mapped `FederatedDataset` (store path, encoded images, fingerprint)."""


@dataclass
class ClientData:
    """One logical client's samples of one split: uint8 images [n, H, W, C] (None when the store
    keeps encoded images of varying size), int64 labels [n], and their ids in the prepared store
    (to look up per-sample extras such as cached CLIP embeddings)."""

    client_id: int
    images: torch.Tensor | None
    labels: torch.Tensor
    sample_ids: np.ndarray | None = None


@dataclass
class ClientUpdate:
    """What a client sends back; `metrics` holds at least "train_loss" (mean over local steps)."""

    client_id: int
    num_samples: int
    tensors: State
    metrics: dict[str, float]


class Algorithm(abc.ABC):
    """Base of every federated algorithm; subclasses register with `@register_algorithm(name, config=...)`."""

    name: ClassVar[str]
    client_eval_splits: ClassVar[tuple[str, ...]] = ("val", "test")
    """Client splits the server passes to `evaluate_clients` (per_domain partitions)."""
    predict_head: ClassVar[str | None] = None
    """How a final state predicts outside the platform (`tracking.mlflow_model`): "classifier" (the
    student network's own head), "retrained_classifier" (student features through the state's
    `retrained_classifier.{weight,bias}`), "clip_adapter" (FedCLIP: a frozen CLIP, named by the
    model spec, and the state's adapter against the class prompts), or None: no exportable model,
    none is logged."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.cfg = ctx.cfg.algorithm

    @classmethod
    def check(cls, cfg: ExperimentConfig) -> None:
        """Driver-side, before the data are prepared or anything starts (also for every trial of a
        sweep): the cheap checks a worker would otherwise fail on. Raises UserError. Default: none."""

    @classmethod
    def prepare(cls, cfg: ExperimentConfig, dataset: Any) -> list[Path]:
        """Driver-side, once per run before any actor starts: check the setting against the data
        and build what actors will only read (e.g. a frozen-CLIP feature cache). Returns the
        directories built, which reach nodes that lack them (`runtime.replicate`). Default: none."""
        return []

    @classmethod
    def inference_state(cls, state: State) -> State:
        """The entries of a final state that `predict_head` needs (what the logged model keeps)."""
        return state

    @classmethod
    def predict_spec(cls, cfg: ExperimentConfig, dataset: Any) -> dict:
        """Entries of the logged model's `fedplatform_model.json` that this algorithm sets or adds
        (e.g. a frozen network to load again, its input view). Default: none."""
        return {}

    @abc.abstractmethod
    def init_server_state(self, seed: int) -> State:
        """Initial server state, a function of `seed` alone; the global RNG is left untouched."""

    @abc.abstractmethod
    def broadcast(self, state: State) -> State:
        """The payload every client sampled this round receives."""

    @abc.abstractmethod
    def client_update(self, payload: State, data: ClientData, generator: torch.Generator) -> ClientUpdate:
        """Local work of one client; all randomness from `generator`."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not getattr(cls, "__abstractmethods__", None) and not cls.streams() \
                and cls.aggregate is Algorithm.aggregate:
            raise TypeError(f"{cls.__name__} implements neither aggregate nor "
                            "aggregate_start/aggregate_add/aggregate_finish")

    def aggregate(self, state: State, updates: list[ClientUpdate], round: int) -> State:
        """New server state from this round's updates (sorted by client id). Implement either this
        (the server then holds the round's updates at once) or the streaming trio below, which
        this default folds the list through."""
        acc = self.aggregate_start(state, round)
        for update in updates:
            self.aggregate_add(acc, update)
        return self.aggregate_finish(state, acc, round)

    @classmethod
    def streams(cls) -> bool:
        """Whether the server folds updates in one at a time (the algorithm has its own trio)."""
        return cls.aggregate_add is not Algorithm.aggregate_add

    def aggregate_start(self, state: State, round: int) -> Any:
        """Streaming aggregation: an accumulator for `round`; `aggregate_add` folds each update in
        (in client-id order), `aggregate_finish` turns it into the new state. Server memory is then
        one update plus the accumulator, whatever the number of clients per round. The defaults
        keep the list of updates and hand it to `aggregate` (an algorithm that needs them all)."""
        return []

    def aggregate_add(self, acc: Any, update: ClientUpdate) -> None:
        acc.append(update)

    def aggregate_finish(self, state: State, acc: Any, round: int) -> State:
        return self.aggregate(state, acc, round)

    @abc.abstractmethod
    def evaluate(self, state: State, test: ClientData) -> dict:
        """Test metrics (see `classification_metrics`) of `state` on the global test set
        (passed as a ClientData with client_id -1)."""

    def evaluate_clients(self, state: State, clients: dict[int, dict[str, ClientData]]) -> dict:
        """Metrics on clients' own splits ({client id: {split: ...}} for `client_eval_splits`), for
        partitions that give clients val/test splits (per_domain). Default: none."""
        return {}


# ---------------------------------------------------------------------------- registry

ALGORITHMS: dict[str, type[Algorithm]] = {}


def register_algorithm(name: str, config: type | None = None) -> Callable[[type[Algorithm]], type[Algorithm]]:
    """Register an Algorithm subclass under `name`, with `config` (a pydantic model, e.g. a
    `fedplatform.config.Section`) as the settings its `algorithm:` section is validated against.
    Built-in algorithms register theirs the same way; `fedplatform.config` also finds it by name
    without importing the algorithm (`BUILTIN_ALGORITHMS`), so validating a config never imports torch."""
    from fedplatform.config import ALGORITHM_CONFIGS, register_algorithm_config

    if config is not None:
        register_algorithm_config(name, config)
    elif name not in ALGORITHM_CONFIGS:
        raise TypeError(f"algorithm '{name}' needs its config model: @register_algorithm({name!r}, config=...)")

    def decorator(cls: type[Algorithm]) -> type[Algorithm]:
        if name in ALGORITHMS and ALGORITHMS[name] is not cls:
            raise ValueError(f"algorithm '{name}' is already registered")
        cls.name = name
        ALGORITHMS[name] = cls
        return cls

    return decorator


def get_algorithm(name: str) -> type[Algorithm]:
    """The algorithm registered as `name`, importing its built-in module or loading its plug-in
    entry point if needed."""
    from fedplatform.algorithms import BUILTIN_ALGORITHMS
    from fedplatform.plugins import ALGORITHM_GROUP, entry_point_names, load_entry_point

    if name not in ALGORITHMS and name in BUILTIN_ALGORITHMS:
        importlib.import_module(f"fedplatform.algorithms.{name}")
    elif name not in ALGORITHMS:
        try:
            load_entry_point(ALGORITHM_GROUP, name)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    if name not in ALGORITHMS:
        known = sorted(set(BUILTIN_ALGORITHMS) | set(ALGORITHMS) | set(entry_point_names(ALGORITHM_GROUP)))
        raise UserError(f"algorithm.name={name!r} is not a known algorithm; choose one of {', '.join(known)}")
    return ALGORITHMS[name]


# ---------------------------------------------------------------------------- helpers


@contextmanager
def seeded_global_rng(seed: int, device: torch.device = torch.device("cpu")) -> Iterator[None]:
    """Seed the global CPU RNG (and `device`'s, if CUDA) for a block, then restore the old state.

    Used where code we do not control draws from the global RNG (module initialisers, dropout),
    so results depend on `seed` alone and the caller's RNG stream is not disturbed.
    """
    cuda = []
    if device.type == "cuda":
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


def draw_seed(generator: torch.Generator) -> int:
    """A 63-bit seed drawn from `generator` (to derive a seed for a nested RNG)."""
    return int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=generator.device))


def classification_metrics(
    preds: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    train_class_counts: Sequence[int] | np.ndarray,
    loss: float | None = None,
) -> dict:
    """Top-1 `accuracy`, `per_class_accuracy` (class-id order; NaN for a class absent from the
    test set) and the long-tail groups `many_shot_acc` (train count > 100), `medium_shot_acc`
    (20..100), `few_shot_acc` (< 20), each the mean per-class accuracy of its classes (omitted
    when no class of the group is in the test set); `loss` is passed through when given."""
    preds = np.asarray(preds).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    counts = np.asarray(train_class_counts)
    num_classes = len(counts)
    correct = preds == labels
    per_class = np.full(num_classes, np.nan)
    for c in range(num_classes):
        mask = labels == c
        if mask.any():
            per_class[c] = correct[mask].mean()
    out: dict = {"accuracy": float(correct.mean()) if len(labels) else float("nan")}
    out["per_class_accuracy"] = [float(a) for a in per_class]
    groups = {
        "many_shot_acc": counts > MANY_SHOT_MIN,
        "medium_shot_acc": (counts >= FEW_SHOT_MAX) & (counts <= MANY_SHOT_MIN),
        "few_shot_acc": counts < FEW_SHOT_MAX,
    }
    for key, members in groups.items():
        accs = per_class[members & ~np.isnan(per_class)]
        if len(accs):
            out[key] = float(accs.mean())
    if loss is not None:
        out["loss"] = float(loss)
    return out


@torch.no_grad()
def evaluate_model(model: nn.Module, images, labels: torch.Tensor, ctx: Context) -> dict:
    """Reference test pass: eval mode, batches of 500 of the un-augmented student view (`images[i:j]`,
    normalised batches, see `algorithms.images`); `classification_metrics` plus the mean
    cross-entropy `loss`."""
    was_training = model.training
    model.eval()
    preds, loss_sum = [], torch.zeros((), dtype=torch.float64, device=ctx.device)
    for start in range(0, len(labels), EVAL_BATCH_SIZE):
        x = images[start : start + EVAL_BATCH_SIZE]
        y = labels[start : start + EVAL_BATCH_SIZE].to(device=ctx.device, dtype=torch.long)
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        preds.append(logits.argmax(1).cpu())
    model.train(was_training)
    pred = torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)
    loss = (loss_sum / max(len(labels), 1)).item()
    return classification_metrics(pred, labels.cpu(), ctx.train_class_counts, loss=loss)
