"""One MLflow run per experiment, driven through `MlflowClient` (no global active-run state).

The tracking store is resolved as: explicit argument (--tracking-uri) > $MLFLOW_TRACKING_URI >
the pipeline's `tracking.tracking_uri` > a local SQLite file `mlflow.db` in the working directory.
The store is checked before any training starts, so an unreachable server fails in seconds.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from fedplatform import storage
from fedplatform.errors import UserError

DEFAULT_URI = "sqlite:///mlflow.db"
# Lands users on the "Model training" runs table instead of MLflow 3's GenAI view.
EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")
TRACKING_SERVERS = ("http://", "https://", "databricks")


def resolve_uri(explicit: str | None, configured: str | None) -> str:
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or configured or DEFAULT_URI


def absolute_uri(uri: str) -> str:
    """sqlite:///relative.db -> sqlite:////abs/relative.db: trial workers run in other directories."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    if uri.startswith("file:"):
        local = uri.removeprefix("file://").removeprefix("file:")
        return "file://" + str(Path(local).resolve())
    return uri


TRACKING_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")
"""MLflow tracking stores fedplatform accepts (a URI without a scheme is rejected: a typo would
silently become a file store)."""
SQLITE_HEADER = b"SQLite format 3\x00"


def check_tracking_uri(uri: str) -> None:
    """A known scheme; a local SQLite file that is a database in a writable folder; a server that
    answers within seconds. Creates nothing."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower() if ":" in uri else ""
    if scheme not in TRACKING_SCHEMES:
        what = f"unknown scheme '{scheme}'" if scheme else "no scheme"
        raise UserError(f"tracking URI {uri[:200]!r} has {what}; use sqlite:///path/mlflow.db, file:///folder, "
                        f"http(s)://host:port or another of: {', '.join(TRACKING_SCHEMES)}")
    if scheme == "sqlite":
        if not uri.startswith("sqlite:///") or uri == "sqlite:///":
            raise UserError(f"tracking URI {uri!r} names no database file; use sqlite:///path/mlflow.db")
        db = Path(uri.removeprefix("sqlite:///")).resolve()
        parent = db.parent
        if not parent.is_dir():
            raise UserError(f"tracking URI '{uri}': directory '{parent}' does not exist; create it or use another --tracking-uri")
        if db.is_dir():
            raise UserError(f"tracking URI '{uri}': '{db}' is a directory; name a database file such as {db}/mlflow.db")
        if db.exists():
            try:
                with open(db, "rb") as f:
                    head = f.read(len(SQLITE_HEADER))
            except OSError as exc:
                raise UserError(f"tracking URI '{uri}': '{db}' cannot be read ({exc.strerror})") from None
            if head and head != SQLITE_HEADER:
                raise UserError(f"tracking URI '{uri}': '{db}' is not an SQLite database; point it at an MLflow "
                                "database or at a new file name")
            if not os.access(db, os.W_OK):
                raise UserError(f"tracking URI '{uri}': '{db}' is not writable")
        elif not os.access(parent, os.W_OK):
            raise UserError(f"tracking URI '{uri}': directory '{parent}' is not writable; run from a writable "
                            "folder or pass --tracking-uri sqlite:////writable/path/mlflow.db")
        return
    if uri.startswith(("http://", "https://")):
        # Fail in seconds, not after MLflow's default minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        from mlflow.tracking import MlflowClient

        try:
            MlflowClient(uri).search_experiments(max_results=1)
        except Exception as exc:  # noqa: BLE001 - any failure here means "cannot reach"
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise UserError(
                f"tracking server '{uri}' cannot be reached ({reason}); start it, fix --tracking-uri, "
                f"or use a local store such as {DEFAULT_URI}"
            ) from None


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def artifact_location(tracking_uri: str, storage_root: str | None, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: `<storage>/mlflow/<experiment>` when
    runtime.storage is a URI and the tracking store is a database or files; None (MLflow's own
    default) otherwise. A tracking server keeps its own artifact root (--artifacts-destination)."""
    if storage_root is None or not storage.is_uri(storage_root) or tracking_uri.startswith(TRACKING_SERVERS):
        return None
    return storage.join(storage_root, "mlflow", experiment)


class Tracker:
    """Logs one experiment to one MLflow run; `run_id` survives resumes. `storage` (runtime.storage)
    decides where a new experiment keeps its artifacts (see `artifact_location`)."""

    def __init__(self, uri: str, storage: str | None = None):
        check_tracking_uri(uri)
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.storage = storage
        self.client = MlflowClient(uri)
        self.run_id: str | None = None

    def _experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:  # an existing experiment keeps its artifact location
            return exp.experiment_id
        return self.client.create_experiment(name, artifact_location=artifact_location(self.uri, self.storage, name),
                                             tags=dict([EXPERIMENT_KIND_TAG]))

    def start(self, experiment: str, run_name: str | None, params: dict[str, Any], tags: dict[str, str],
              parent_run_id: str | None = None, default_name: str = "run") -> str:
        """A new run named `run_name`, else `<default_name>-<HHMMSS>-<first 4 of the run id>`: runs of one
        pipeline get distinct names (MLflow's are random words)."""
        all_tags = dict(tags)
        if run_name:
            all_tags["mlflow.runName"] = run_name
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self._experiment_id(experiment), tags=all_tags)
        self.run_id = run.info.run_id
        if not run_name:
            self.client.set_tag(self.run_id, "mlflow.runName", f"{default_name}-{time.strftime('%H%M%S')}-{self.run_id[:4]}")
        from mlflow.entities import Param

        items = [Param(k, "null" if v is None else str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow's per-batch param limit
            self.client.log_batch(self.run_id, params=items[i:i + 100])
        return self.run_id

    def resume(self, run_id: str) -> None:
        try:
            run = self.client.get_run(run_id)
        except Exception:  # noqa: BLE001
            raise UserError(f"MLflow run '{run_id}' does not exist in tracking store '{self.uri}'") from None
        self.run_id = run.info.run_id
        if "error" in run.data.tags:  # "error" describes how the run ended; it goes on now
            self.client.set_tag(self.run_id, "resumed_after_error", run.data.tags["error"])
            self.client.delete_tag(self.run_id, "error")
        self.client.update_run(self.run_id, status="RUNNING")

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def log_dataset(self, name: str, digest: str, source: str, tags: dict[str, str]) -> None:
        """Dataset lineage (`mlflow.log_input`): the dataset as an MLflow dataset input of the run,
        `tags` on the input (e.g. the partition, context=train)."""
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource
        from mlflow.entities import DatasetInput, InputTag

        from mlflow.exceptions import MlflowException

        dataset = MetaDataset(LocalArtifactDatasetSource(source), name=name, digest=digest)._to_mlflow_entity()
        inputs = [DatasetInput(dataset, [InputTag(k, v) for k, v in tags.items()])]
        try:
            self.client.log_inputs(self.run_id, inputs)
        except MlflowException:
            # Sweep trials starting together insert the same dataset row at once: one wins the
            # unique (experiment, name, digest) key, the others then find it and link to it.
            time.sleep(0.5)
            self.client.log_inputs(self.run_id, inputs)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def log_file(self, path: str | Path, artifact_dir: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_dir)

    def log_text(self, name: str, text: str) -> None:
        """`name` may hold a folder (client_failures/round_0003_client_7.txt)."""
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / Path(name).name
            p.write_text(text)
            self.log_file(p, Path(name).parent.as_posix() if "/" in name else None)

    def log_json(self, name: str, obj: Any) -> None:
        self.log_text(name, json.dumps(obj, indent=2, sort_keys=True))

    def finish(self, error: BaseException | None = None) -> None:
        if self.run_id is None:
            return
        status = "FINISHED"
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            status = "KILLED"  # stopped, not failed: Ctrl-C, or Tune ending a trial (SystemExit)
        elif error is not None:
            self.client.set_tag(self.run_id, "error", f"{type(error).__name__}: {error}"[:5000])
            status = "FAILED"
        self.client.set_terminated(self.run_id, status=status)
