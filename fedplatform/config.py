"""Typed experiment configuration: a pipeline YAML fully describes one experiment.

Every section is a pydantic model with unknown keys forbidden. `load_config` reads a YAML
file, applies dotted `--set` overrides and validates; every problem becomes a `ConfigError`
whose message is one readable line naming the key, the bad value and what is allowed.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, create_model,
                      field_validator, model_validator)

from fedplatform.errors import UserError


class ConfigError(UserError):
    """A user-facing configuration problem (one line, exit code 2)."""


class Section(BaseModel):
    # inf / nan are never a meaningful setting: rejected in every float field
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(Section):
    """Where samples come from and how the global training pool is made long-tailed."""

    dataset: str = "digits"
    """Registered source: digits, cifar10, cifar100, imagefolder_domains, imagenet_lt."""
    root: str | None = None
    """Directory holding the data (not needed for digits)."""
    download: bool = False
    """Download cifar10/cifar100 with torchvision when `root` holds no data."""
    imbalance_factor: float = Field(1.0, ge=1.0)
    """IF = n_max / n_min of the exponential long-tail profile; 1 keeps the data balanced."""
    longtail_seed: int | None = Field(None, ge=0, le=2**32 - 1)
    """Seed of the long-tail selection (which images each class keeps); null = the run seed. The
    CLIP2FL reference always uses 7 whatever `--seed` is (spec clip2fl 3.1)."""
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    """Stratified held-out test share for sources without an official test split (digits)."""
    test_domain: str | list[str] | None = None
    """per_domain: domain held out of training as the global test set, or a list of them (the
    FedCLIP reference's `test_envs`): each is scored alone, `accuracy` is their mean."""
    cache_dir: str | None = None
    """Prepared-data cache; default $FEDPLATFORM_CACHE or ~/.cache/fedplatform."""

    @model_validator(mode="after")
    def _test_domains(self):
        if isinstance(self.test_domain, list) and (not self.test_domain or len(set(self.test_domain)) < len(self.test_domain)):
            raise ValueError(f"data.test_domain={self.test_domain} must name each held-out domain once; "
                             "give one or more distinct domain names, or null to hold none out")
        return self


class PartitionConfig(Section):
    """How the long-tailed training pool is split over logical clients."""

    scheme: str = "dirichlet"
    """Registered partitioner: iid, dirichlet, clip2fl_reference, per_domain."""
    num_clients: int = Field(10, ge=1)
    dirichlet_alpha: float = Field(0.5, gt=0.0)
    """Concentration of the per-class Dirichlet draw (dirichlet, clip2fl_reference)."""
    min_client_size: int = Field(10, ge=0)
    """dirichlet: redraw until every client holds at least this many samples."""
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    """per_domain: train/val/test fractions of each participating domain (FedCLIP: 0.6/0.2/0.2)."""

    @model_validator(mode="after")
    def _fractions(self):
        if any(f < 0 for f in self.split_fractions) or sum(self.split_fractions) > 1.0 + 1e-9:
            raise ValueError(
                f"partition.split_fractions={list(self.split_fractions)} must be non-negative "
                "and sum to at most 1"
            )
        return self


class ModelConfig(Section):
    """The student network trained by the clients."""

    name: str = "small_cnn"
    """Registered backbone: small_cnn (8x8 digits), small_cnn_512, resnet8 (CLIP2FL reference
    student), resnet8_creff (original CReFF student: no add_mlp, 256-d features), resnet50
    (ImageNet-LT student, 2048 -> 512 projection), mlp (flattened pixels -> 64 -> classes, ReLU)."""
    input_size: int = Field(224, ge=8)
    """Student input size S for datasets kept as encoded images of varying size (ImageNet-LT,
    PACS): train RandomResizedCrop(S), test Resize(S·256/224) + CenterCrop(S). Fixed-size datasets
    (digits, CIFAR) use their own size."""


class ClipConfig(Section):
    """Frozen CLIP used as a teacher (CLIP2FL) or as the backbone (FedCLIP)."""

    model: str | None = None
    """open_clip model name (e.g. ViT-B-32, fedplatform-tiny); null when unused."""
    pretrained: str | None = None
    """open_clip tag (openai, laion2b_s34b_b79k, ...), a local checkpoint path, or null (untrained)."""


def _check_template(template: str) -> str:
    if "{}" not in template:
        raise ValueError(f"algorithm.prompt_template={template!r} must contain '{{}}' for the class name")
    return template


PromptTemplate = Annotated[str, AfterValidator(_check_template)]
"""A CLIP prompt with one '{}' for the class name."""


class LocalTraining(Section):
    """Reference local SGD: lr 0.1, batch 32, no momentum or weight decay."""

    local_epochs: int = Field(10, ge=1)
    lr: float = Field(0.1, gt=0.0)
    batch_size: int = Field(32, ge=1)
    augmentation: Literal["reference", "per_sample", "imagenet", "none"] = "reference"
    """Fixed-size images: reference (one random crop, pad 4, and flip per batch, as the CLIP2FL
    code), per_sample (an independent draw per image) or none. Encoded images (ImageNet-LT, PACS):
    imagenet (RandomResizedCrop + flip + ColorJitter(0.4, 0.4, 0.4, 0)) or none."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Local training arithmetic: fp32 (reference) or bf16 autocast of the forward pass (weights,
    gradients, optimizer and the loss stay fp32; no loss scaling needed). bf16 changes the numbers
    slightly; it is fast on GPUs and on CPUs with AMX/AVX512-BF16."""


class FedAvgMConfig(Section):
    """FedAvgM (Hsu et al. 2019) as in Reddi et al. 2021: v_t = momentum * v_{t-1} + delta_t,
    x_{t+1} = x_t + lr * v_t (delta_t = client average - x_t)."""

    name: Literal["fedavgm"] = "fedavgm"
    lr: float = Field(1.0, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)


class FedAdamConfig(Section):
    """FedAdam (Reddi et al. 2021, Algorithm 2; no bias correction): m_t = beta1 * m + (1 - beta1) * delta_t,
    v_t = beta2 * v + (1 - beta2) * delta_t^2, x_{t+1} = x_t + lr * m_t / (sqrt(v_t) + tau)."""

    name: Literal["fedadam"] = "fedadam"
    lr: float = Field(0.1, gt=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.99, ge=0.0, lt=1.0)
    tau: float = Field(1e-3, gt=0.0)
    """Adaptivity: the larger, the closer to server SGD with momentum."""


class FedYogiConfig(FedAdamConfig):
    """FedYogi (Reddi et al. 2021): FedAdam with v_t = v - (1 - beta2) * delta_t^2 * sign(v - delta_t^2)."""

    name: Literal["fedyogi"] = "fedyogi"
    lr: float = Field(0.01, gt=0.0)


SERVER_OPTIMIZER_CONFIGS: dict[str, type[Section]] = {
    "fedavgm": FedAvgMConfig,
    "fedadam": FedAdamConfig,
    "fedyogi": FedYogiConfig,
}
ServerOptimizerConfig = Annotated[Union[tuple(SERVER_OPTIMIZER_CONFIGS.values())], Field(discriminator="name")]


class FedAvgConfig(LocalTraining):
    """FedAvg (McMahan et al. 2017): sample-weighted mean of every state entry."""

    name: Literal["fedavg"] = "fedavg"
    server_optimizer: ServerOptimizerConfig | None = None
    """null: the plain average becomes the new global model (McMahan et al.); fedavgm, fedadam or
    fedyogi: the server steps on the pseudo-gradient (average - global) instead (Reddi et al. 2021)."""

    @field_validator("server_optimizer", mode="before")
    @classmethod
    def _name_alone(cls, value):
        """`server_optimizer: fedadam` is short for `server_optimizer: {name: fedadam}`."""
        return {"name": value} if isinstance(value, str) else value


class FedProxConfig(FedAvgConfig):
    """FedProx (Li et al. 2020): local loss + mu/2 * ||w - w_global||^2."""

    name: Literal["fedprox"] = "fedprox"
    mu: float = Field(0.01, ge=0.0)


class SyntheticConfig(Section):
    """Synthetic load for measuring the platform: each client busy-waits `work_s` seconds and
    returns the global weights of `model.name` unchanged."""

    name: Literal["synthetic"] = "synthetic"
    work_s: float = Field(0.5, ge=0.0)
    update_mb: float = Field(0.0, ge=0.0)
    """Extra float32 entry of this many MB in the state; each client fills it from its generator,
    so updates differ (for measuring aggregation at a chosen update size)."""


class FedCLIPConfig(Section):
    """FedCLIP (Lu et al. 2023; spec fedclip): frozen CLIP, an image-side attention adapter trained
    with the symmetric in-batch contrastive loss and averaged by the server. Defaults = reference."""

    name: Literal["fedclip"] = "fedclip"
    lr: float = Field(5e-5, gt=0.0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0.0)
    weight_decay: float = Field(0.2, ge=0.0)
    optimizer: Literal["adam", "adamw"] = "adam"
    """adam: coupled L2 decay as the reference (gradient += wd * w); adamw: decoupled (spec §8.4 option)."""
    local_epochs: int = Field(1, ge=1)
    """wk_iters: passes over the local train split per round, one optimizer for all of them."""
    batch_size: int = Field(32, ge=2)
    aggregation: Literal["uniform", "sample_weighted"] = "uniform"
    """uniform: mean over participating clients (reference); sample_weighted: FedAvg weights (§8.2 option)."""
    loss: Literal["in_batch", "all_classes"] = "in_batch"
    """in_batch: symmetric image-text CE over the batch (reference); all_classes: K-way CE against
    every class prompt (§8.11 option, documented deviation)."""
    use_feature_cache: bool = True
    """Train on cached frozen-CLIP image embeddings; false runs the image encoder every step (reference)."""
    prompt_template: PromptTemplate = "a picture of a {}"
    clean_class_names: bool = False
    """Underscores in class folder names to spaces (the reference keeps them)."""


class CReFFConfig(LocalTraining):
    """CReFF (Shang et al., IJCAI 2022) as run inside the CLIP2FL reference (spec clip2fl §4, §6):
    FedAvg local training; per-class classifier gradients uploaded; the server learns federated
    features by gradient matching and re-trains a classifier on them. Defaults = reference."""

    name: Literal["creff"] = "creff"
    num_features_per_class: int = Field(100, ge=1)
    """m: federated features per class (`num_of_feature`; the reference only runs with 100)."""
    match_epoch: int = Field(100, ge=0)
    """Full-batch SGD steps on the federated features per round."""
    lr_feature: float = Field(0.1, gt=0.0)
    crt_epoch: int = Field(300, ge=0)
    """Epochs of classifier re-training on the features per round (batch `batch_size`)."""
    lr_net: float = Field(0.01, gt=0.0)
    batch_real: int = Field(32, ge=1)
    """Real images per class per gradient draw (10 draws, one DSA augmentation each)."""
    dis_metric: Literal["ours", "mse", "cos"] = "ours"
    """Gradient-matching distance: ours (per-row cosine + bias row), mse, cos (spec §5.2)."""
    gml_form: Literal["reference", "paper"] = "reference"
    """reference: sum over the C weight rows + the bias row; paper: mean over weight rows only (§8)."""
    real_gradient: Literal["reference", "paper"] = "reference"
    """reference: mean of 10 DSA mini-batches of <= batch_real; paper: mean over all local class samples (§8)."""
    gradient_weighting: Literal["unweighted", "by_count"] = "unweighted"
    """Server mean of the clients' class gradients: unweighted (reference) or weighted by n_c^k (§9.7)."""

    @model_validator(mode="after")
    def _gml(self):
        if self.gml_form == "paper" and self.dis_metric != "ours":
            raise ValueError(f"algorithm.gml_form=paper is the paper's per-row cosine; it needs dis_metric=ours, "
                             f"got {self.dis_metric!r}")
        return self


class CLIP2FLConfig(CReFFConfig):
    """CLIP2FL (Shi et al., AAAI 2024; spec clip2fl): CReFF plus client KD from a frozen CLIP teacher
    (CE + kd_weight * T^2 * KL(teacher || student)) and the prototype contrastive loss on the
    federated features. Defaults = reference commit 565e858."""

    name: Literal["clip2fl"] = "clip2fl"
    kd_weight: float = Field(1.0, ge=0.0)
    """alpha (the paper's beta); 2 before 2024-05-02."""
    kd_temperature: float = Field(3.0, gt=0.0)
    contrast_weight: float = Field(0.001, ge=0.0)
    """eta (`contrast_alpha`); 0.5 before 2024-04-26."""
    ins_temp: float = Field(0.1, gt=0.0)
    """tau of the prototype contrastive loss."""
    pcl_form: Literal["reference", "paper"] = "reference"
    """reference: contrast against the repeated text prototypes (closed form, N x C); paper: against
    the other federated features (N x N, unconfirmed transcription, spec §8)."""
    use_feature_cache: bool = True
    """Teacher image embeddings from the feature cache; false runs CLIP every step (reference)."""
    prompt_template: PromptTemplate = "a photo of a {}"
    clean_class_names: bool = False
    """Underscores in class names to spaces (the reference keeps them)."""


ALGORITHM_CONFIGS: dict[str, type[BaseModel]] = {}
"""Registered algorithm config models by algorithm name (the built-in ones below; plug-ins add theirs
with `register_algorithm(name, config=...)`). The `algorithm` section is validated against the one
its `name` picks."""


def register_algorithm_config(name: str, config: type[BaseModel]) -> type[BaseModel]:
    """Register `config` (a pydantic model, ideally a `Section`) as the settings of algorithm `name`.
    A model without a `name` field equal to `name` gets one (`name: Literal[name]`)."""
    if not (isinstance(config, type) and issubclass(config, BaseModel)):
        raise TypeError(f"algorithm {name!r}: config must be a pydantic model class, got {config!r}")
    field = config.model_fields.get("name")
    if field is None or field.default != name:
        config = create_model(config.__name__, __base__=config, __module__=config.__module__,
                              name=(Literal[name], name))
    known = ALGORITHM_CONFIGS.setdefault(name, config)
    if (known.__module__, known.__qualname__) != (config.__module__, config.__qualname__):
        raise ValueError(f"algorithm '{name}' already has a config ({known.__module__}.{known.__qualname__})")
    return known


for _name, _config in {"fedavg": FedAvgConfig, "fedprox": FedProxConfig, "synthetic": SyntheticConfig,
                       "fedclip": FedCLIPConfig, "creff": CReFFConfig, "clip2fl": CLIP2FLConfig}.items():
    register_algorithm_config(_name, _config)


def algorithm_config(name: Any) -> type[BaseModel]:
    """The config model of algorithm `name`: registered, else from the installed entry point of that
    name (`fedplatform.plugins`); ValueError listing the known ones."""
    from fedplatform.plugins import ALGORITHM_GROUP, entry_point_names, load_entry_point

    if isinstance(name, str) and name not in ALGORITHM_CONFIGS:
        load_entry_point(ALGORITHM_GROUP, name)
        if name in entry_point_names(ALGORITHM_GROUP) and name not in ALGORITHM_CONFIGS:
            raise ValueError(f"algorithm.name={name!r}: its entry point loaded but registered no algorithm of that "
                             f"name; decorate its class with @register_algorithm({name!r}, config=...)")
    if name not in ALGORITHM_CONFIGS:
        known = list(ALGORITHM_CONFIGS) + [n for n in entry_point_names(ALGORITHM_GROUP) if n not in ALGORITHM_CONFIGS]
        bad = f"algorithm.name={name!r} is not a known algorithm" if name is not None else "algorithm needs a name"
        raise ValueError(f"{bad}; choose one of {', '.join(known)} (or list the module that registers it "
                         "under plugins:)")
    return ALGORITHM_CONFIGS[name]


def default_storage() -> str:
    """runtime.storage when neither the pipeline nor --storage/--set sets it."""
    return os.environ.get("FEDPLATFORM_STORAGE") or "fedplatform_runs"


class Resources(Section):
    num_cpus: float = Field(1.0, ge=0.0)
    num_gpus: float = Field(0.0, ge=0.0)
    """A fraction shares a GPU; on CUDA it is also the process's memory budget."""


class RuntimeConfig(Section):
    """How the experiment is laid out on Ray."""

    num_client_actors: int | Literal["auto"] = "auto"
    """Actors that run logical clients; auto = as many as the resources allow, capped by
    clients_per_round (inside a placement group, sized from that group)."""
    client_resources: Resources = Resources()
    server_resources: Resources = Resources()
    max_client_retries: int = Field(2, ge=0)
    """Times a client is re-run on a fresh actor after its actor died."""
    round_timeout_s: float = Field(3600.0, gt=0.0)
    client_failures: Literal["abort", "skip"] = "abort"
    """abort: a client that raises (or exceeds client_timeout_s) fails the run; skip: it is dropped
    from its round, which completes if at least min_clients replied."""
    min_clients: int | None = Field(None, ge=1)
    """With client_failures=skip: replies a round needs (default 1); at most clients_per_round."""
    client_timeout_s: float | None = Field(None, gt=0.0)
    """Seconds one client may run on its actor before it counts as failed (its actor is replaced);
    default none beyond round_timeout_s."""
    wait_for_resources_s: float = Field(600.0, ge=0.0)
    """On an autoscaling cluster: how long to wait for the autoscaler to add the nodes a run or a
    sweep's first trial needs (0 = fail at once). A fixed cluster never waits."""
    eval_every: int = Field(1, ge=1)
    checkpoint_every: int = Field(1, ge=1)
    storage: str = Field(default_factory=default_storage)
    """Where run checkpoints and sweep state go: a local or NFS path, or a URI pyarrow.fs resolves
    (s3://bucket/prefix). On a multi-node cluster use shared storage, so any node and a new head
    can resume. Default: $FEDPLATFORM_STORAGE, else fedplatform_runs."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    allow_nonfinite: bool = False
    """false: a client loss or model state that becomes inf/nan stops the run (exit 1, MLflow run
    FAILED, the last good checkpoint kept); true: train on regardless."""

    @model_validator(mode="after")
    def _actors(self):
        if isinstance(self.num_client_actors, int) and self.num_client_actors < 1:
            raise ValueError(
                f"runtime.num_client_actors={self.num_client_actors} must be >= 1 or 'auto'"
            )
        if self.min_clients is not None and self.client_failures != "skip":
            raise ValueError(f"runtime.min_clients={self.min_clients} only applies with runtime.client_failures=skip "
                             f"(abort needs every client); set client_failures: skip or drop min_clients")
        return self


class TrackingConfig(Section):
    experiment: str = Field("fedplatform", min_length=1, max_length=200, pattern=r"\S")
    """MLflow experiment name."""
    tracking_uri: str | None = None
    """Default: --tracking-uri, then $MLFLOW_TRACKING_URI, then sqlite:///mlflow.db."""
    run_name: str | None = None
    """Default: <name>-<algorithm>-s<seed>-<HHMMSS>-<first 4 of the run id> (distinct for every run)."""
    register_model: str | None = Field(None, min_length=1, max_length=200, pattern=r"\S")
    """Register the run's logged model (artifact `model`) in the MLflow Model Registry under this name."""


class ExperimentConfig(Section):
    """One federated experiment."""

    name: str = Field("experiment", min_length=1, max_length=200)
    seed: int = Field(7, ge=0, le=2**32 - 1)
    """numpy's RandomState range."""
    data: DataConfig = DataConfig()
    partition: PartitionConfig = PartitionConfig()
    model: ModelConfig = ModelConfig()
    clip: ClipConfig = ClipConfig()
    plugins: list[str] = []
    """Modules the driver and every actor import before the algorithm section is validated: they
    register plug-in algorithms and models (`fedplatform.plugins`); installed entry points need no entry."""
    algorithm: SerializeAsAny[BaseModel] = FedAvgConfig()
    """Validated against the config model registered for its `name` (ALGORITHM_CONFIGS)."""
    rounds: int = Field(200, ge=1)
    clients_per_round: int = Field(8, ge=1)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)  # reads $FEDPLATFORM_STORAGE now
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="before")
    @classmethod
    def _algorithm_section(cls, raw):
        """Import the plug-ins, then validate `algorithm` against its name's config (default fedavg)."""
        from fedplatform.plugins import import_plugins

        if not isinstance(raw, dict):
            return raw
        plugins = raw.get("plugins", [])
        if not isinstance(plugins, list) or not all(isinstance(p, str) and p.strip() for p in plugins):
            raise ValueError(f"plugins={shorten(plugins)} must be a list of module names, e.g. [mypackage.algorithms]")
        import_plugins(plugins)
        algo = raw.get("algorithm")
        if isinstance(algo, BaseModel) or algo is None and "algorithm" not in raw:
            return raw
        if not isinstance(algo, dict):
            raise ValueError(f"algorithm={shorten(algo)} is invalid: it must be a section (name: ALGORITHM and "
                             "its settings)")
        name = algo.get("name", "fedavg")
        config = algorithm_config(name)
        try:
            section = config.model_validate({**algo, "name": name})
        except ValidationError as exc:
            raise ValueError(_error_line(exc.errors()[0], config, "algorithm", f"algorithm.name={name}")) from None
        return {**raw, "algorithm": section}

    @model_validator(mode="after")
    def _cross_checks(self):
        if self.clients_per_round > self.partition.num_clients:
            raise ValueError(
                f"clients_per_round={self.clients_per_round} exceeds "
                f"partition.num_clients={self.partition.num_clients}; use at most that many"
            )
        if (self.runtime.min_clients or 0) > self.clients_per_round:
            raise ValueError(f"runtime.min_clients={self.runtime.min_clients} exceeds clients_per_round="
                             f"{self.clients_per_round}; a round can get at most that many replies")
        return self


# ---------------------------------------------------------------------------- loading


def parse_value(text: str) -> Any:
    """Type a command-line value as YAML does: 3 -> int, 0.1 -> float, true -> bool, [1,2] -> list."""
    if not text.strip():
        return ""
    try:
        value = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError:
        return text
    _expanded_size(value, {}, set())
    return value


def apply_override(raw: dict, dotted: str, value: Any) -> None:
    """Set raw['a']['b'] = value for dotted 'a.b', creating intermediate sections."""
    keys = dotted.split(".")
    node = raw
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{'.'.join(keys[: i + 1])}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set algorithm.lr=0.05")
        out.append((key.strip(), parse_value(value)))
    return out


_TAGGED_SECTIONS: dict[str, tuple[dict[str, type[Section]], str]] = {
    "algorithm.server_optimizer": (SERVER_OPTIMIZER_CONFIGS, "server optimizer"),
}
"""Sections chosen by their `name` (discriminated unions): their configs and what they are called."""


def _error_line(err: dict, model: type[BaseModel] | None = None, loc: str = "", chosen: str = "") -> str:
    """One readable line for pydantic error `err` of `model` (ExperimentConfig) whose location
    starts under `loc`; `chosen` names how that section was picked (algorithm.name=fedavg)."""
    model = model or ExperimentConfig
    parts = [str(p) for p in err["loc"] if not str(p).startswith("function-")]
    for i, part in enumerate(parts):
        # discriminated unions insert the tag into the location: x.server_optimizer.fedadam.lr -> x.server_optimizer.lr
        if loc in _TAGGED_SECTIONS and part in _TAGGED_SECTIONS[loc][0]:
            model, chosen = _TAGGED_SECTIONS[loc][0][part], f"{loc}.name={part}"
            continue
        loc = f"{loc}.{part}" if loc else part
        if i < len(parts) - 1:
            model, chosen = _field_model(model, part), ""
    value = err.get("input")
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = sorted(model.model_fields) if model else ["(see the configuration reference in README.md)"]
        here = f"for {chosen}" if chosen else "here"
        return f"unknown key '{loc}'; allowed keys {here}: {', '.join(allowed)}"
    if kind in ("union_tag_invalid", "union_tag_not_found") and loc in _TAGGED_SECTIONS:
        configs, what = _TAGGED_SECTIONS[loc]
        name = value.get("name") if isinstance(value, dict) else None
        bad = f"{loc}.name={name!r} is not a known {what}" if name is not None else f"{loc} needs a name"
        return f"{bad}; choose one of {', '.join(configs)}"
    if kind == "value_error":
        return err["msg"].removeprefix("Value error, ")
    shown = shorten(value) if not isinstance(value, dict) else "a section"
    return f"{loc}={shown} is invalid: {err['msg'][0].lower()}{err['msg'][1:]}"


def _field_model(model: type[BaseModel] | None, key: str) -> type[BaseModel] | None:
    """The section model of field `key` of `model`, or None when it is not one section."""
    ann = getattr(model.model_fields.get(key) if model else None, "annotation", None)
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) and ann is not BaseModel else None


def validate(raw: dict) -> ExperimentConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"a pipeline must be a YAML mapping of sections, got {type(raw).__name__} {shorten(raw, 60)}")
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_error_line(exc.errors()[0])) from None


MAX_YAML_BYTES = 1 << 20
"""Pipelines and search spaces are a few KB; anything over 1 MiB is not one."""
MAX_YAML_NODES = 100_000
"""Cap on values after alias expansion (a YAML 'billion laughs' expands to gigabytes)."""


def shorten(value: Any, limit: int = 120) -> str:
    """repr(value), cut to `limit` characters: an error echoes a value, never megabytes of it."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


class _Loader(yaml.SafeLoader):
    """Safe YAML (plain data only, never Python objects) that rejects duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):
                continue  # an unhashable key fails in SafeLoader with its own message
            if key in seen:
                raise ConfigError(f"duplicate key {shorten(key, 60)} at line {key_node.start_mark.line + 1}; "
                                  "each key may appear once")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(obj: Any, memo: dict, active: set) -> int:
    """Values in `obj` with every alias expanded (shared objects counted once per use)."""
    if not isinstance(obj, (dict, list)):
        return 1
    if id(obj) in active:
        raise ConfigError("a YAML alias refers to itself (a recursive structure); remove the recursion")
    if id(obj) not in memo:
        active.add(id(obj))
        children = [*obj.keys(), *obj.values()] if isinstance(obj, dict) else obj
        memo[id(obj)] = 1 + sum(_expanded_size(c, memo, active) for c in children)
        active.discard(id(obj))
        if memo[id(obj)] > MAX_YAML_NODES:
            raise ConfigError(f"expands to more than {MAX_YAML_NODES:,} values (YAML aliases); "
                              "write the values out or use fewer aliases")
    return memo[id(obj)]


def load_yaml_mapping(path: str | Path, what: str) -> dict:
    """Read a small YAML mapping safely: a UserError (naming `what` and the file) for a missing,
    unreadable, oversized, binary, empty or non-mapping file, duplicate keys or an alias bomb."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what} '{path}' is a directory; give the YAML file itself")
    if not p.is_file():
        raise ConfigError(f"{what} '{path}' does not exist")
    try:
        if p.stat().st_size > MAX_YAML_BYTES:
            raise ConfigError(f"{what} '{path}' is {p.stat().st_size:,} bytes; a {what} is at most "
                              f"{MAX_YAML_BYTES:,} bytes of YAML")
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} '{path}' is not a UTF-8 text file (binary?); give a YAML file") from None
    except OSError as exc:
        raise ConfigError(f"{what} '{path}' cannot be read ({exc.strerror or exc})") from None
    try:
        raw = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
        _expanded_size(raw, {}, set())
    except ConfigError as exc:
        raise ConfigError(f"{what} '{path}': {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{what} '{path}' is not valid YAML{where}") from None
    except RecursionError:
        raise ConfigError(f"{what} '{path}' nests too deeply to be a {what}") from None
    if raw is None or raw == {}:
        raise ConfigError(f"{what} '{path}' is empty; it must be a YAML mapping of sections "
                          "(an empty pipeline would silently run all defaults)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} '{path}' must be a YAML mapping of sections (key: value), "
                          f"got a {type(raw).__name__} {shorten(raw, 60)}")
    return raw


def read_yaml(path: str | Path) -> dict:
    return load_yaml_mapping(path, "pipeline file")


def load_config(path: str | Path, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a pipeline YAML, apply `KEY=VALUE` overrides, validate."""
    raw = read_yaml(path)
    for key, value in parse_overrides(list(overrides)):
        apply_override(raw, key, value)
    return validate(raw)


def to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1} (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
