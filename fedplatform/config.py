"""Typed experiment configuration: a pipeline YAML fully describes one experiment.

Every section is a pydantic model with unknown keys forbidden. `load_config` reads a YAML
file, applies dotted `--set` overrides and validates; every problem becomes a `ConfigError`
whose message is one readable line naming the key, the bad value and what is allowed.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, create_model,
                      model_validator)

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


ALGORITHM_CONFIGS: dict[str, type[BaseModel]] = {}
"""Registered algorithm config models by algorithm name: a built-in one's the first time its name is
asked for (`fedplatform.algorithms.BUILTIN_ALGORITHMS`), a plug-in's when it registers with
`register_algorithm(name, config=...)`. The `algorithm` section is validated against the one its
`name` picks."""


def register_algorithm_config(name: str, config: type[BaseModel]) -> type[BaseModel]:
    """Register `config` (a pydantic model, ideally a `Section`) as the settings of algorithm `name`.
    A model without a `name` field equal to `name` gets one (`name: Literal[name]`)."""
    if not (isinstance(config, type) and issubclass(config, BaseModel)):
        raise TypeError(f"algorithm {name!r}: config must be a pydantic model class, got {config!r}")
    field = config.model_fields.get("name")
    if field is None or field.default != name:
        config = create_model(config.__name__, __base__=config, __module__=config.__module__,
                              name=(Literal[name], name))
    _load_builtin(name)  # a built-in name is taken even before its config was first asked for
    known = ALGORITHM_CONFIGS.setdefault(name, config)
    if (known.__module__, known.__qualname__) != (config.__module__, config.__qualname__):
        raise ValueError(f"algorithm '{name}' already has a config ({known.__module__}.{known.__qualname__})")
    return known


def _load_builtin(name: Any) -> None:
    """Register built-in algorithm `name`'s config, imported from its light module (no torch)."""
    from importlib.metadata import EntryPoint

    from fedplatform.algorithms import BUILTIN_ALGORITHMS
    from fedplatform.plugins import ALGORITHM_GROUP

    if isinstance(name, str) and name in BUILTIN_ALGORITHMS and name not in ALGORITHM_CONFIGS:
        ALGORITHM_CONFIGS[name] = EntryPoint(name, BUILTIN_ALGORITHMS[name], ALGORITHM_GROUP).load()


def algorithm_config(name: Any) -> type[BaseModel]:
    """The config model of algorithm `name`: registered, else the built-in one of that name, else from
    the installed entry point of that name (`fedplatform.plugins`); ValueError listing the known ones."""
    from fedplatform.algorithms import BUILTIN_ALGORITHMS
    from fedplatform.plugins import ALGORITHM_GROUP, entry_point_names, load_entry_point

    _load_builtin(name)
    if isinstance(name, str) and name not in ALGORITHM_CONFIGS:
        load_entry_point(ALGORITHM_GROUP, name)
        if name in entry_point_names(ALGORITHM_GROUP) and name not in ALGORITHM_CONFIGS:
            raise ValueError(f"algorithm.name={name!r}: its entry point loaded but registered no algorithm of that "
                             f"name; decorate its class with @register_algorithm({name!r}, config=...)")
    if name not in ALGORITHM_CONFIGS:
        known = list(dict.fromkeys([*BUILTIN_ALGORITHMS, *ALGORITHM_CONFIGS, *entry_point_names(ALGORITHM_GROUP)]))
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
    server_process: Literal["auto", "driver", "actor"] = "auto"
    """Where the server runs. driver: in the process that runs the rounds (`fedplatform run`'s, the
    Python API caller's, a sweep trial's): no Ray worker to start, no round trip per call; actor: a
    Ray actor with server_resources, placed by Ray; auto: driver when the server asks for no GPU
    and the cluster is one fixed node the driver runs on (not a Ray Client), else actor. Both give
    the same numbers."""
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
        if self.server_process == "driver" and self.server_resources.num_gpus:
            raise ValueError(f"runtime.server_process=driver cannot take runtime.server_resources.num_gpus="
                             f"{self.server_resources.num_gpus:g} (Ray gives GPU shares to actors only); use "
                             "server_process actor or auto")
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
    algorithm: SerializeAsAny[BaseModel] = Field(default_factory=lambda: algorithm_config("fedavg")())
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


def _error_line(err: dict, model: type[BaseModel] | None = None, loc: str = "", chosen: str = "") -> str:
    """One readable line for pydantic error `err` of `model` (ExperimentConfig) whose location
    starts under `loc`; `chosen` names how that section was picked (algorithm.name=fedavg)."""
    model = model or ExperimentConfig
    parts = [str(p) for p in err["loc"] if not str(p).startswith("function-")]
    tagged: dict[str, type[BaseModel]] = {}
    for i, part in enumerate(parts):
        # a section chosen by its name puts the name into the location: x.server_optimizer.fedadam.lr -> x.server_optimizer.lr
        if part in tagged:
            model, chosen, tagged = tagged[part], f"{loc}.name={part}", {}
            continue
        tagged = _named_sections(model, part)
        loc = f"{loc}.{part}" if loc else part
        if i < len(parts) - 1:
            model, chosen = _field_model(model, part), ""
    value = err.get("input")
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = sorted(model.model_fields) if model else ["(see the configuration reference in README.md)"]
        here = f"for {chosen}" if chosen else "here"
        return f"unknown key '{loc}'; allowed keys {here}: {', '.join(allowed)}"
    if kind in ("union_tag_invalid", "union_tag_not_found") and tagged:
        name = value.get("name") if isinstance(value, dict) else None
        what = parts[-1].replace("_", " ")
        bad = f"{loc}.name={name!r} is not a known {what}" if name is not None else f"{loc} needs a name"
        return f"{bad}; choose one of {', '.join(tagged)}"
    if kind == "value_error":
        return err["msg"].removeprefix("Value error, ")
    shown = shorten(value) if not isinstance(value, dict) else "a section"
    return f"{loc}={shown} is invalid: {err['msg'][0].lower()}{err['msg'][1:]}"


def _field_model(model: type[BaseModel] | None, key: str) -> type[BaseModel] | None:
    """The section model of field `key` of `model`, or None when it is not one section."""
    ann = getattr(model.model_fields.get(key) if model else None, "annotation", None)
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) and ann is not BaseModel else None


def _named_sections(model: type[BaseModel] | None, key: str) -> dict[str, type[BaseModel]]:
    """{name: section} when field `key` of `model` is one of several sections chosen by their `name`
    (`Annotated[Union[...], Field(discriminator="name")]`, or that `| None`), else {}."""
    field = model.model_fields.get(key) if model else None
    if field is None:
        return {}
    unions = [field.annotation] if field.discriminator == "name" else [
        get_args(a)[0] for a in get_args(field.annotation)
        if get_origin(a) is Annotated and any(getattr(m, "discriminator", None) == "name" for m in get_args(a)[1:])]
    return {s.model_fields["name"].default: s for union in unions for s in get_args(union)}


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
