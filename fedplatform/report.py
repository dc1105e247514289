"""`fedplatform report`: a paper table over seeds from finished MLflow runs (a sweep's trials, an
experiment, or run ids), grouped by configuration: the params that differ between the runs, the
seed and execution settings (`runtime.*`, `tracking.*`) excluded. Each cell is the mean ± the
sample standard deviation (ddof=1) over the group's runs; written as Markdown, CSV and LaTeX, with
the groups' per-round accuracy curves (mean and std band) as a PNG."""
from __future__ import annotations

import csv
import io
import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from fedplatform import storage
from fedplatform.errors import UserError

IGNORED = ("seed", "tracking.", "runtime.")
"""Params that never tell configurations apart: the replica's seed and how it ran, not what."""
METRICS = {  # column -> label
    "final_accuracy": "final accuracy", "best_accuracy": "best accuracy", "many_shot_acc": "many-shot",
    "medium_shot_acc": "medium-shot", "few_shot_acc": "few-shot", "rounds": "rounds",
    "wall_time_s": "wall time (s)",
}
CAPTION = ("Mean ± sample standard deviation (ddof=1; none for a single run) over the n runs (seeds) of each "
           "configuration; "
           "accuracy on the global test set at the last round (final) and at its best round; wall time = "
           "the sum of the rounds' wall time.")
RUN_ID = re.compile(r"[0-9a-f]{32}")


@dataclass
class Report:
    keys: list[str]
    """Config keys that tell the groups apart (table's first columns)."""
    rows: list[dict] = field(default_factory=list)
    """Per group: its key values, n, `<metric>_mean`/`_std`, run_ids."""
    curves: list[list[list[tuple[int, float]]]] = field(default_factory=list)
    """Per group, per run: (round, accuracy)."""

    @property
    def metrics(self) -> list[str]:
        return [m for m in METRICS if any(r.get(f"{m}_mean") is not None for r in self.rows)]


def report(sources: list[str], out: str | Path = "report", tracking_uri: str | None = None,
           storage_root: str | None = None) -> tuple[Report, dict[str, Path]]:
    """Build the table for `sources` and write report.md/.csv/.tex and accuracy_curves.png to `out`."""
    client, runs = load_runs(sources, tracking_uri, storage_root)
    rep = build(client, runs)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; give a directory (it is created if missing)")
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out / "report.md", "csv": out / "report.csv", "latex": out / "report.tex",
             "plot": out / "accuracy_curves.png"}
    files["markdown"].write_text(to_markdown(rep) + "\n")
    files["csv"].write_text(to_csv(rep))
    files["latex"].write_text(to_latex(rep))
    plot_curves(rep, files["plot"])
    return rep, files


# ---------------------------------------------------------------------------- which runs


def _client(tracking_uri: str | None):
    from mlflow.tracking import MlflowClient

    from fedplatform.tracking.mlflow_run import absolute_uri, check_tracking_uri, resolve_uri

    uri = absolute_uri(resolve_uri(tracking_uri, None))
    check_tracking_uri(uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UserError(f"tracking store '{uri}' does not exist; pass the --tracking-uri the runs were logged to")
    return MlflowClient(uri), uri


def _sweep_dir(source: str, root: str) -> str | None:
    """A sweep directory, the name of one under <root>/sweeps (with its start time or without:
    the latest of that name), or None."""
    from fedplatform.tune.sweep import SWEEP_STATE, _sweep_dirs

    if storage.is_file(storage.join(source, SWEEP_STATE)):
        return source
    if "/" in source or source in (".", ".."):
        return None
    sweeps = storage.join(root, "sweeps")
    if storage.is_file(storage.join(sweeps, source, SWEEP_STATE)):
        return storage.join(sweeps, source)
    found = _sweep_dirs(sweeps, source) if storage.exists(sweeps) else []
    return found[-1] if found else None


def load_runs(sources: list[str], tracking_uri: str | None, storage_root: str | None) -> tuple:
    """(client, finished runs) for a sweep, an MLflow experiment name, or run ids."""
    from fedplatform.config import default_storage
    from fedplatform.tune.sweep import SWEEP_STATE, _child_runs

    root = storage_root or default_storage()
    source = sources[0]
    sweep = _sweep_dir(source, root) if len(sources) == 1 else None
    if sweep is not None:
        state = json.loads(storage.read_bytes(storage.join(sweep, SWEEP_STATE)))
        client, uri = _client(tracking_uri or state.get("tracking_uri"))
        try:
            runs = _child_runs(client, state["parent_run_id"])
        except Exception:  # noqa: BLE001 - the store holds no such run
            raise UserError(f"sweep {sweep}: its MLflow parent run {state['parent_run_id']} is not in tracking "
                            f"store '{uri}'; pass the --tracking-uri the sweep logged to") from None
        what = f"sweep {sweep}"
    else:
        client, uri = _client(tracking_uri)
        experiment = client.get_experiment_by_name(source) if len(sources) == 1 else None
        if experiment is not None:
            runs = _search(client, experiment.experiment_id)
            what = f"experiment '{source}'"
        else:
            runs = [_get_run(client, uri, s, root, len(sources)) for s in sources]
            what = "the given runs"
    runs = [r for r in runs if r.data.tags.get("fedplatform.kind") != "sweep"]
    finished = [r for r in runs if r.info.status == "FINISHED"]
    if not finished:
        raise UserError(f"{what} holds no finished run ({len(runs)} run(s), none FINISHED); nothing to report")
    if len(finished) < len(runs):
        import logging

        logging.getLogger("fedplatform").warning("%d of %d runs of %s are not FINISHED; left out",
                                                 len(runs) - len(finished), len(runs), what)
    return client, finished


def _search(client, experiment_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _get_run(client, uri: str, source: str, root: str, count: int):
    if RUN_ID.fullmatch(source):
        try:
            return client.get_run(source)
        except Exception:  # noqa: BLE001 - MlflowException: no such run
            raise UserError(f"MLflow run '{source}' does not exist in tracking store '{uri}'") from None
    if count > 1:
        raise UserError(f"report source {source!r} is not an MLflow run id (32 hex digits); several sources "
                        "must all be run ids")
    raise UserError(f"report source {source!r} is not a sweep directory, a sweep name under "
                    f"'{storage.join(root, 'sweeps')}', an MLflow experiment or a run id in tracking store '{uri}'")


# ---------------------------------------------------------------------------- the table


def _ordered(value: str | None):
    """Numbers in numeric order (10 before 50 before 100), then text."""
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def build(client, runs: list) -> Report:
    """Group `runs` by the params that differ (seed and runtime./tracking. keys excluded)."""
    params = [r.data.params for r in runs]
    names = sorted({k for p in params for k in p if not k.startswith(IGNORED)})
    keys = [k for k in names if len({p.get(k) for p in params}) > 1] or ["algorithm.name"]
    groups: dict[tuple, list] = {}
    for run in sorted(runs, key=lambda r: (int(r.data.params.get("seed", 0) or 0), r.info.start_time)):
        groups.setdefault(tuple(run.data.params.get(k) for k in keys), []).append(run)
    rep = Report(keys)
    for values in sorted(groups, key=lambda v: tuple(_ordered(x) for x in v)):
        members = groups[values]
        per_run, curves = [], []
        for run in members:
            history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "accuracy"))
            curves.append(history)
            m = run.data.metrics
            per_run.append({
                "final_accuracy": history[-1][1] if history else None,
                "best_accuracy": max(v for _, v in history) if history else None,
                **{k: m.get(k) for k in ("many_shot_acc", "medium_shot_acc", "few_shot_acc")},
                "rounds": history[-1][0] if history else None,
                "wall_time_s": m.get("summary/total_time_s"),
            })
        row = dict(zip(keys, values))
        row["n"] = len(members)
        for metric in METRICS:
            got = [v[metric] for v in per_run if v[metric] is not None]
            row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std(got)
        row["run_ids"] = " ".join(r.info.run_id for r in members)
        rep.rows.append(row)
        rep.curves.append(curves)
    return rep


def _cell(row: dict, metric: str, pm: str = " ± ") -> str:
    mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
    if mean is None:
        return "-"
    digits = 1 if metric == "wall_time_s" else 0 if metric == "rounds" else 4
    text = f"{mean:.{digits}f}"
    if metric == "rounds" and not std:  # every run the same length: no ± 0
        return text
    return text + (pm + f"{std:.{digits}f}" if std is not None else "")


def _label(rep: Report, row: dict) -> str:
    return " ".join(f"{k.rsplit('.', 1)[-1]}={row[k]}" for k in rep.keys)


def to_markdown(rep: Report) -> str:
    head = [*rep.keys, "n", *(METRICS[m] for m in rep.metrics)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in rep.rows:
        lines.append("| " + " | ".join([*(str(row[k]) for k in rep.keys), str(row["n"]),
                                        *(_cell(row, m) for m in rep.metrics)]) + " |")
    return "\n".join(lines + ["", CAPTION])


def to_csv(rep: Report) -> str:
    """Full precision, one mean and one std column per metric (empty std: a single run)."""
    columns = [*rep.keys, "n", *(f"{m}_{s}" for m in rep.metrics for s in ("mean", "std")), "run_ids"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rep.rows)
    return buf.getvalue()


def _tex(text: str) -> str:
    return re.sub(r"([_%&#$])", r"\\\1", str(text))


def to_latex(rep: Report) -> str:
    head = [*rep.keys, "$n$", *(METRICS[m] for m in rep.metrics)]
    lines = [r"\begin{table}[t]", r"\centering",
             r"\caption{" + _tex(CAPTION).replace("±", r"$\pm$") + "}",
             r"\begin{tabular}{" + "l" * len(rep.keys) + "r" * (len(head) - len(rep.keys)) + "}",
             r"\toprule", " & ".join(_tex(h) if h != "$n$" else h for h in head) + r" \\", r"\midrule"]
    pm = r" \pm "
    for row in rep.rows:
        cells = [*(_tex(row[k]) for k in rep.keys), str(row["n"]),
                 *(f"${_cell(row, m, pm)}$" if row[f"{m}_mean"] is not None else "--" for m in rep.metrics)]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def plot_curves(rep: Report, path: Path) -> Path:
    """Per configuration: mean test accuracy per round, with a ± std band over its runs."""
    from fedplatform.tracking.plots import _figure

    fig = _figure((7.0, 4.5))
    ax = fig.add_subplot()
    for row, curves in zip(rep.rows, rep.curves):
        by_round: dict[int, list[float]] = {}
        for curve in curves:
            for step, value in curve:
                by_round.setdefault(step, []).append(value)
        steps = sorted(by_round)
        if not steps:
            continue
        mean = [statistics.fmean(by_round[s]) for s in steps]
        std = [statistics.stdev(by_round[s]) if len(by_round[s]) > 1 else 0.0 for s in steps]
        (line,) = ax.plot(steps, mean, marker="." if len(steps) < 30 else None,
                          label=f"{_label(rep, row)} (n={row['n']})")
        ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=line.get_color(), alpha=0.2)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path

