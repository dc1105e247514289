"""Seeds in sweeps (replicas of every configuration) and `fedplatform report`: the table over seeds
equals what the child runs' MLflow metrics give, in Markdown, CSV and LaTeX, with a curves plot."""
from __future__ import annotations

import csv
import statistics
import warnings

import pytest
from mlflow.tracking import MlflowClient

from test_sweep import write_space

from fedplatform.cli import main
from fedplatform.config import ConfigError
from fedplatform.tune import run_sweep
from fedplatform.tune.space import load_spec
from fedplatform.tune.sweep import _child_runs

LRS, SEEDS = [0.05, 0.2], [1, 2]


@pytest.fixture(scope="module")
def seeded_sweep(tmp_path_factory, ray_session):
    """2 learning rates x 2 seeds, 2 rounds each."""
    tmp = tmp_path_factory.mktemp("seeds")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    path = write_space(tmp, space={"algorithm.lr": {"grid": LRS}}, seeds=SEEDS, scheduler={"name": "fifo"})
    # half a CPU for the server and the client actor: all 4 trials at once on the session's 4 CPUs
    result = run_sweep(path, ["rounds=2", "runtime.server_resources.num_cpus=0.5",
                              "runtime.client_resources.num_cpus=0.5"], tracking_uri=uri)
    return tmp, uri, result


def test_every_configuration_runs_once_per_seed_and_replicas_share_their_configuration_tag(seeded_sweep):
    _, uri, result = seeded_sweep
    assert sorted((r["algorithm.lr"], r["seed"]) for r in result.rows) == [(lr, s) for lr in LRS for s in SEEDS]
    assert all(r["status"] == "finished" for r in result.rows)
    kids = _child_runs(MlflowClient(uri), result.parent_run_id)
    assert sorted((float(k.data.params["algorithm.lr"]), int(k.data.params["seed"])) for k in kids) == [
        (lr, s) for lr in LRS for s in SEEDS]
    configs = {(k.data.params["algorithm.lr"], k.data.tags["sweep.config"]) for k in kids}
    assert configs == {(str(lr), f"lr={lr:.4g}") for lr in LRS}
    # the seeds are not the same run twice
    by_lr = {}
    for k in kids:
        by_lr.setdefault(k.data.params["algorithm.lr"], set()).add(k.data.metrics["train_loss"])
    assert all(len(losses) == 2 for losses in by_lr.values())


def _recomputed(client, kids) -> dict[str, dict[str, tuple[float, float]]]:
    """Per learning rate: (mean, sample std) of each metric, from the child runs' metric histories."""
    values: dict[str, dict[str, list[float]]] = {}
    for kid in kids:
        acc = [m.value for m in sorted(client.get_metric_history(kid.info.run_id, "accuracy"), key=lambda m: m.step)]
        shots = {k: sorted(client.get_metric_history(kid.info.run_id, k), key=lambda m: m.step)[-1].value
                 for k in ("many_shot_acc", "medium_shot_acc", "few_shot_acc")}
        got = values.setdefault(kid.data.params["algorithm.lr"], {})
        for metric, value in {"final_accuracy": acc[-1], "best_accuracy": max(acc), **shots}.items():
            got.setdefault(metric, []).append(value)
    return {lr: {m: (statistics.fmean(v), statistics.stdev(v)) for m, v in got.items()} for lr, got in values.items()}


def test_report_table_means_and_stds_equal_the_child_runs_recomputed(seeded_sweep, tmp_path, capsys):
    _, uri, result = seeded_sweep
    client = MlflowClient(uri)
    expected = _recomputed(client, _child_runs(client, result.parent_run_id))
    out = tmp_path / "report"
    assert main(["report", result.path, "--out", str(out), "--tracking-uri", uri]) == 0
    printed = capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"report.md", "report.csv", "report.tex", "accuracy_curves.png"}
    assert (out / "accuracy_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert [r["algorithm.lr"] for r in rows] == [str(lr) for lr in LRS] and all(r["n"] == "2" for r in rows)
    markdown, latex = (out / "report.md").read_text(), (out / "report.tex").read_text()
    for row in rows:
        for metric, (mean, std) in expected[row["algorithm.lr"]].items():
            assert float(row[f"{metric}_mean"]) == pytest.approx(mean, rel=1e-12, abs=1e-15)
            assert float(row[f"{metric}_std"]) == pytest.approx(std, rel=1e-12, abs=1e-15)
        final = expected[row["algorithm.lr"]]["final_accuracy"]
        line = next(x for x in markdown.splitlines() if x.startswith(f"| {row['algorithm.lr']} | 2 |"))
        assert f"{final[0]:.4f} ± {final[1]:.4f}" in line and line in printed
        assert f"${final[0]:.4f} \\pm {final[1]:.4f}$" in latex
        assert row["rounds_mean"] == "2.0" and row["rounds_std"] == "0.0"
    assert "sample standard deviation (ddof=1;" in markdown and "ddof=1" in latex


def test_report_finds_a_sweep_by_name_under_storage_with_its_own_tracking_store(seeded_sweep, tmp_path, capsys):
    tmp, _, result = seeded_sweep
    out = tmp_path / "by-name"
    assert main(["report", "space", "--storage", str(tmp / "runs"), "--out", str(out)]) == 0
    assert (out / "report.csv").read_text().count(result.parent_run_id) == 0  # trials only, no parent
    assert len(list(csv.DictReader((out / "report.csv").open()))) == 2


def test_bad_report_source_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # an existing, empty store
    capsys.readouterr()  # MLflow's own lines on creating it
    assert main(["report", "no-such-thing", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: report source 'no-such-thing' is not a sweep directory")
    assert main(["report", "0" * 32, "--tracking-uri", uri]) == 2
    assert capsys.readouterr().err == f"error: MLflow run '{'0' * 32}' does not exist in tracking store '{uri}'\n"
    assert main(["report", "x", "--tracking-uri", f"sqlite:///{tmp_path / 'missing.db'}"]) == 2
    assert "does not exist; pass the --tracking-uri the runs were logged to" in capsys.readouterr().err
    assert not (tmp_path / "report").exists() and not (tmp_path / "missing.db").exists()


@pytest.mark.parametrize("over, message", [
    ({"searcher": "optuna", "space": {"algorithm.lr": {"choice": [0.1, 0.2]}}},
     r"seeds need searcher: basic over grid values only, .* \(got searcher: optuna\)"),
    ({"space": {"algorithm.lr": {"uniform": [0.1, 0.2]}}}, r"got space.algorithm.lr: uniform"),
    ({"scheduler": {"name": "asha"}}, "seeds need scheduler: fifo"),
    ({"space": {"seed": {"grid": [1, 2]}}}, "either as seeds: or as space.seed"),
    ({"seeds": [1, 1]}, r"seeds: \[1, 1\] must be a non-empty list of distinct run seeds"),
])
def test_seeds_where_replicas_would_not_share_a_configuration_are_one_clear_error(tmp_path, over, message):
    spec = {"seeds": [1, 2], "scheduler": {"name": "fifo"}, **over}
    with pytest.raises(ConfigError, match=message):
        load_spec(write_space(tmp_path, **spec))


def test_a_sweep_plot_without_any_finished_trial_draws_no_empty_legend(tmp_path):
    from fedplatform.tracking.plots import plot_sweep_metric

    rows = [{"algorithm": "fedavg", "algorithm.lr": 0.1, "accuracy": None}]  # its only trial failed
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns about a legend with nothing in it
        path = plot_sweep_metric(rows, "algorithm.lr", "accuracy", tmp_path / "plot.png")
    assert path.stat().st_size > 0
