"""Run one experiment end to end: prepare data, start the actors, loop over rounds, track, checkpoint.

Everything that can be wrong with the input (config, storage, data, resources, tracking store, resume
target) is checked before the MLflow run or the run directory is created, so bad input never
leaves a half-made run behind.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import ray

from fedplatform import __version__, storage
from fedplatform.config import ExperimentConfig, flatten, to_yaml
from fedplatform.errors import RunInterrupted, UserError
from fedplatform.runtime import checkpoint as ckpt_io
from fedplatform.runtime.checkpoint import Checkpoint, ClientSampler
from fedplatform.runtime.engine import Engine, summarize
from fedplatform.runtime.replicate import PreparedData, publish_location
from fedplatform.tracking.mlflow_run import Tracker, check_tracking_uri, git_commit, resolve_uri

log = logging.getLogger(__name__)

# Keys that may change on resume without changing the numbers (more rounds, other resources).
RESUMABLE_CHANGES = ("rounds", "runtime.", "tracking.", "data.cache_dir", "data.root")


@dataclass
class RunResult:
    run_id: str
    run_dir: str
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


COMMAND_STARTED: float | None = None
"""`time.perf_counter()` at the start of the `fedplatform` process, set by the CLI: the start-up
metrics then count from the process start; otherwise (Python API, sweep trials) from the call."""


class _StartupClock:
    """Start-up phases on the perf_counter clock: each `mark(phase)` ends one, starting where the
    previous ended (the first at `origin`). Logged as `time/startup/<phase>_s` when the run ends."""

    def __init__(self, origin: float):
        self.origin = self.last = origin
        self.phases: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase], self.last = now - self.last, now


RAY_CONNECT_TIMEOUT_S = 5.0
"""How long `--ray-address host:port` may take to accept a TCP connection (Ray itself retries for minutes)."""


def check_ray_address(address: str | None) -> None:
    """Fail in seconds, with one line, when nothing listens at an explicit host:port (checked
    first, before data, MLflow or a run directory are touched)."""
    import socket

    if not address:
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if address == "auto" or not sep:
        return
    if not port.isdigit() or not host:
        raise UserError(f"--ray-address {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379), ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as exc:
        raise UserError(f"--ray-address {address}: nothing accepts connections there within "
                        f"{RAY_CONNECT_TIMEOUT_S:g} s ({getattr(exc, 'strerror', None) or exc}); start the "
                        "cluster (ray start --head) or fix the address") from None


def ensure_ray(address: str | None = None) -> None:
    """Connect to `address`, else to $RAY_ADDRESS (set by `ray job submit`, or `auto` on a cluster
    head), else start a local Ray of our own: never latch onto whichever cluster was last started
    on this machine, as a bare `ray.init()` would."""
    if ray.is_initialized():
        return
    check_ray_address(address)
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    try:
        ray.init(address=address, include_dashboard=False, logging_level="WARNING", configure_logging=True)
    except ConnectionError as exc:
        if "InvalidAuthToken" in str(exc.__cause__):  # Ray retried for 20 s first
            raise UserError(f"--ray-address {address}: the Ray cluster there asks for an authentication token and "
                            "this process sent none; set RAY_AUTH_MODE=token, with the cluster's token in "
                            "~/.ray/auth_token or $RAY_AUTH_TOKEN") from None
        raise UserError(f"--ray-address {address}: cannot connect to a Ray cluster there ({exc})") from None


def _resume_target(cfg: ExperimentConfig, resume: str, runs: str) -> tuple[str, Checkpoint, dict]:
    run_dir = ckpt_io.find_run_dir(runs, resume)
    ckpt, state = ckpt_io.load(run_dir)
    changed = [k for k in ckpt_io.config_differences(ckpt.config, cfg.model_dump(mode="json"))
               if not k.startswith(RESUMABLE_CHANGES)]
    if changed:
        raise UserError(f"--resume {resume}: the pipeline differs from the run's config in {', '.join(changed)}; "
                        "resume with the same settings (only rounds, runtime and tracking may change)")
    if ckpt.round >= cfg.rounds:
        raise UserError(f"--resume {resume}: the run already finished {ckpt.round} of rounds={cfg.rounds}; "
                        f"pass --set rounds=N with N > {ckpt.round} to continue it")
    return run_dir, ckpt, state


def run_experiment(
    cfg: ExperimentConfig,
    *,
    tracking_uri: str | None = None,
    resume: str | None = None,
    parent_run_id: str | None = None,
    on_round: Callable[[dict, str], None] | None = None,
    progress: bool = True,
    ray_address: str | None = None,
    runs_under: str | None = None,
    tags: dict[str, str] | None = None,
) -> RunResult:
    """Train `cfg` on the connected Ray cluster; returns the per-round history and the summary.
    The run directory is `<runs_under>/<MLflow run id>`, by default under runtime.storage (a sweep
    trial passes its own folder there); `tags` go on a new MLflow run (a trial's configuration)."""
    clock = _StartupClock(COMMAND_STARTED if COMMAND_STARTED is not None else time.perf_counter())
    from fedplatform.data import prepare

    from fedplatform.algorithms import get_algorithm

    if resume is not None and not resume.strip():
        raise UserError("--resume needs a run id or a run directory, got an empty value")
    check_ray_address(ray_address)
    storage.check_writable(cfg.runtime.storage)
    runs = runs_under or cfg.runtime.storage
    resumed = _resume_target(cfg, resume, runs) if resume is not None else None
    uri = resolve_uri(tracking_uri, cfg.tracking.tracking_uri)
    check_tracking_uri(uri)  # creates nothing, unlike the Tracker (an SQLite file)
    algorithm = get_algorithm(cfg.algorithm.name)
    algorithm.check(cfg)
    clock.mark("imports")  # the CLI: interpreter, config, Ray, torch and the algorithm's modules
    ds = prepare(cfg)
    clock.mark("data")
    with ThreadPoolExecutor(1) as background, tempfile.TemporaryDirectory() as tmp:
        # MLflow's import and store set-up, and the partition plot, overlap Ray's and the actors' start-up.
        tracker_ready = background.submit(Tracker, uri, storage=cfg.runtime.storage)
        plot = background.submit(_plot_partition, ds, Path(tmp)) if resumed is None else None
        try:
            ensure_ray(ray_address)  # before algorithm.prepare: a feature cache is built on this cluster
            clock.mark("ray_init")
            prepared = algorithm.prepare(cfg, ds)
            engine = Engine(cfg, PreparedData.serve(ds.path, prepared, publish_location(cfg)),
                            cfg.runtime.num_client_actors, server_state=resumed[2] if resumed else None, wait=False)
        except BaseException:
            tracker_ready.cancel()
            raise
        try:
            tracker = tracker_ready.result()
            engine.wait_ready()
            clock.mark("actors")
            tags = {"fedplatform.server_process": engine.server.where, **(tags or {})}
            run_dir, start_round, history, sampler = _start_tracking(cfg, ds, tracker, resumed, runs, parent_run_id,
                                                                      tags, plot.result() if plot else None)
            clock.mark("mlflow")
        except BaseException:
            engine.shutdown()
            raise
    log.info("MLflow run %s, checkpoints in %s", tracker.run_id, run_dir)
    engine.on_drop = lambda r, cid, reason, detail: _log_drop(tracker, r, cid, reason, detail)
    recorder = _Recorder(background=on_round is None)
    try:
        with _Progress(cfg.rounds, start_round - 1, enabled=progress) as bar:
            rounds_start = time.perf_counter()
            for r in range(start_round, cfg.rounds + 1):
                evaluate = r % cfg.runtime.eval_every == 0 or r == cfg.rounds
                row = engine.run_round(r, sampler.sample(), evaluate)
                history.append(row)
                ckpt = state = None
                if r % cfg.runtime.checkpoint_every == 0 or r == cfg.rounds:
                    ckpt = Checkpoint(r, tracker.run_id, sampler.get_state(), cfg.model_dump(mode="json"),
                                      ds.fingerprint, list(history), dropped=_dropped(history))
                    state = engine.snapshot()  # the server's state after round r, whenever it is fetched
                recorder.submit(_record, tracker, run_dir, row, ckpt, state, bar)
                if on_round is not None:
                    on_round(row, run_dir)
            recorder.flush()
        # start-up: to the first round's start; rounds: to the last round's metrics and checkpoint written
        timing = {"time/startup_s": rounds_start - clock.origin, **{f"time/startup/{phase}_s": s for phase, s in
                  clock.phases.items()}, "time/rounds_total_s": time.perf_counter() - rounds_start}
        summary = summarize(history)
        tracker.log_metrics(history[-1]["round"], timing)
        _log_final(tracker, cfg, ds, history, summary, engine.state())
    except BaseException as exc:
        recorder.close()  # the rounds that ran are recorded before the run is marked failed or killed
        tracker.finish(exc)
        if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, RunInterrupted):
            raise RunInterrupted(tracker.run_id) from exc
        raise
    finally:
        recorder.close()
        engine.shutdown()
    tracker.finish()
    return RunResult(tracker.run_id, run_dir, history, summary)


def _record(tracker: Tracker, run_dir: str, row: dict, ckpt: Checkpoint | None, state, bar: "_Progress") -> None:
    """One round's record: its metrics in MLflow, its checkpoint, and only then its progress line,
    so a round reported as done is in MLflow and in the checkpoint whatever happens next."""
    tracker.log_metrics(row["round"], {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "round"})
    if ckpt is not None:
        ckpt.history = ckpt_io.jsonable(ckpt.history)
        ckpt_io.save(run_dir, ckpt, state())
    bar.update(row)


class _Recorder:
    """Writes each round's record on one background thread while the next round runs (MLflow and
    the checkpoint off the critical path), one round at a time: `submit` first waits for the
    previous record, `flush` for the last, and both re-raise a record's error. With
    `background=False` (a sweep trial, which reports each checkpoint to Tune) it writes in place."""

    def __init__(self, background: bool):
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="record") if background else None
        self.pending = None

    def submit(self, fn, *args) -> None:
        self.flush()
        if self.pool is None:
            fn(*args)
        else:
            self.pending = self.pool.submit(fn, *args)

    def flush(self) -> None:
        if self.pending is None:
            return
        try:
            self.pending.result()  # a Ctrl-C while waiting leaves it pending, for close()
        except Exception:
            self.pending = None
            raise
        self.pending = None

    def close(self) -> None:
        """After a failure: finish the record in flight; its own error is only logged."""
        try:
            self.flush()
        except Exception as exc:  # noqa: BLE001 - the run's own error is the one to report
            log.warning("the last round's record could not be written: %s", exc)
        if self.pool is not None:
            self.pool.shutdown()


def _start_tracking(cfg: ExperimentConfig, ds, tracker: Tracker, resumed, runs: str, parent_run_id: str | None,
                    tags: dict[str, str] | None, partition_png: Path | None) -> tuple[str, int, list[dict], ClientSampler]:
    """Open the MLflow run (a new one, or the resumed run's) once the actors are up, so an actor that
    cannot start leaves no run behind. Returns (run dir, first round, history so far, sampler)."""
    sampler = ClientSampler(cfg.seed, ds.client_ids, cfg.clients_per_round)
    if resumed:
        run_dir, ckpt, _ = resumed
        tracker.resume(ckpt.run_id)
        sampler.set_state(ckpt.sampler)
        return run_dir, ckpt.round + 1, ckpt.history, sampler
    tracker.start(cfg.tracking.experiment, cfg.tracking.run_name, flatten(cfg.model_dump(mode="json")),
                  {**_tags(cfg, ds), **(tags or {})}, parent_run_id,
                  default_name=f"{cfg.name}-{cfg.algorithm.name}-s{cfg.seed}")
    tracker.log_text("config.yaml", to_yaml(cfg))
    _log_dataset(tracker, cfg, ds)
    tracker.log_file(partition_png)
    return storage.join(runs, tracker.run_id), 1, [], sampler


def _log_drop(tracker: Tracker, round: int, client: int, reason: str, detail: str) -> None:
    """runtime.client_failures=skip dropped a client: a warning, and its traceback as an artifact."""
    log.warning("round %d: client %d %s; dropped from the round", round, client, reason)
    tracker.log_text(f"client_failures/round_{round:04d}_client_{client}.txt",
                     f"client {client}, round {round}: {reason}\n\n{detail}\n")


def _dropped(history: list[dict]) -> dict[str, list[int]]:
    return {str(h["round"]): list(h["dropped_clients"]) for h in history if h.get("dropped_clients")}


def _tags(cfg: ExperimentConfig, ds) -> dict[str, str]:
    tags = {
        "fedplatform.version": __version__,
        "fedplatform.algorithm": cfg.algorithm.name,
        "dataset": ds.dataset,
        "dataset_fingerprint": ds.fingerprint,
        "clip_pretrained": str(cfg.clip.model is not None and cfg.clip.pretrained is not None).lower(),
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def _plot_partition(ds, folder: Path) -> Path:
    from fedplatform.tracking.plots import plot_partition

    path = folder / "partition.png"
    plot_partition(ds.describe(), path)
    return path


def _log_dataset(tracker: Tracker, cfg: ExperimentConfig, ds) -> None:
    """Lineage: the prepared store as the run's training input, digest = the start of its
    fingerprint (MLflow keeps 36 characters), the partition as tags."""
    p = cfg.partition
    tags = {"mlflow.data.context": "train", "fingerprint": ds.fingerprint, "partition.scheme": p.scheme,
            "partition.num_clients": str(p.num_clients), "partition.dirichlet_alpha": str(p.dirichlet_alpha),
            "data.imbalance_factor": str(cfg.data.imbalance_factor)}
    tracker.log_dataset(ds.dataset, ds.fingerprint[:32], str(ds.path), tags)


def _log_final(tracker: Tracker, cfg: ExperimentConfig, ds, history: list[dict], summary: dict, state: dict) -> None:
    from safetensors.torch import save_file

    from fedplatform.tracking.mlflow_model import log_model
    from fedplatform.tracking.plots import plot_accuracy_curve, plot_per_class_accuracy

    tracker.log_json("summary.json", summary)
    # also as metrics, so the runs table compares final, best and selected numbers side by side
    tracker.log_metrics(summary["rounds"], {f"summary/{k}": v for k, v in summary.items() if k != "rounds"})
    evals = [h for h in history if h.get("per_class_accuracy") is not None]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        tracker.log_file(tmp / "model.safetensors")
        if evals:
            plot_accuracy_curve(history, tmp / "accuracy_curve.png")
            plot_per_class_accuracy(evals[-1]["per_class_accuracy"], ds.train_class_counts, ds.class_names,
                                    tmp / "per_class_accuracy.png")
            tracker.log_file(tmp / "accuracy_curve.png")
            tracker.log_file(tmp / "per_class_accuracy.png")
    start = time.perf_counter()
    log_model(tracker.uri, tracker.run_id, cfg, ds, state)
    tracker.log_metrics(summary["rounds"], {"time/log_model_s": time.perf_counter() - start})


class _Progress:
    """Progress on stderr (silent when disabled): a live bar with round, accuracy and time per round
    on a terminal; one line per round otherwise (logs of `ray job submit`, CI, pipes)."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.total, self.done, self.enabled = total, done, enabled
        self.bar = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console

            console = Console(stderr=True)
            if console.is_terminal:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

                self.bar = Progress(TextColumn("round"), MofNCompleteColumn(), BarColumn(),
                                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console)
                self.bar.start()
                self.task = self.bar.add_task("train", total=self.total, completed=self.done, info="")
        self.start = time.perf_counter()
        return self

    def update(self, row: dict) -> None:
        if not self.enabled:
            return
        info = (f"acc {row['accuracy']:.4f}  " if "accuracy" in row else "") + f"{row['time/round_s']:.2f} s/round"
        if self.bar is not None:
            self.bar.update(self.task, advance=1, info=info)
        else:
            elapsed = int(time.perf_counter() - self.start)
            print(f"round {row['round']}/{self.total}  {info}  {elapsed // 60}:{elapsed % 60:02d}",
                  file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False
