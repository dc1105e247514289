"""The sweep's summary: one row per trial (status, swept values, final metrics), written as CSV,
logged to the parent MLflow run with plots, and printed as a table."""
from __future__ import annotations

import csv
import io
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from fedplatform import storage
from fedplatform.config import ExperimentConfig
from fedplatform.tune.space import SweepSpec


@dataclass
class SweepResult:
    name: str
    parent_run_id: str
    path: str
    """The sweep directory (runtime.storage/sweeps/<name>-<start time>): a path or a URI."""
    rows: list[dict] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)

    def table(self) -> str:
        return format_table(self.rows, self.columns)


SUMMARY_METRICS = ("accuracy", "many_shot_acc", "medium_shot_acc", "few_shot_acc")


def summarize(grid, spec: SweepSpec, keys: list[str], cfg: ExperimentConfig, name: str, parent_run_id: str,
               sweep_dir: str, tracker) -> SweepResult:
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
    storage.write_bytes(storage.join(sweep_dir, "sweep_summary.csv"), table.encode())
    tracker.log_text("sweep_summary.csv", table)
    done = [r for r in rows if r.get("accuracy") is not None]
    with tempfile.TemporaryDirectory() as tmp:  # drawn here, then copied to the sweep dir and MLflow
        plots = []
        for key in keys:
            if key in ("algorithm.name", "seed"):  # seeds are replicas, not a value to compare
                continue
            plots.append(Path(tmp) / f"accuracy_vs_{key.replace('.', '_')}.png")
            plot_sweep_metric(done, key, "accuracy", plots[-1])
        if any(r.get("many_shot_acc") is not None for r in done):
            plots.append(Path(tmp) / "shot_accuracy_per_trial.png")
            plot_sweep_groups(done, ("many_shot_acc", "medium_shot_acc", "few_shot_acc"), plots[-1])
        for path in plots:
            storage.write_bytes(storage.join(sweep_dir, "plots", path.name), path.read_bytes())
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
