"""Sweeps end to end on the session Ray (4 logical CPUs): trials are experiments in placement groups,
nested MLflow runs, ASHA early stopping, concurrency, trial restarts from checkpoints, Ctrl-C and
--resume, bad input."""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient

from quickstart_helpers import QUICKSTART, first_client

import fedplatform.tune.progress
from fedplatform.cli import main
from fedplatform.config import ConfigError
from fedplatform.errors import UserError
from fedplatform.tune import run_sweep
from fedplatform.tune.sweep import _child_runs

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("ray_session")


def write_space(tmp: Path, **over) -> Path:
    spec = {
        "base": str(QUICKSTART),
        "set": {"rounds": 3, "algorithm.local_epochs": 1, "runtime.num_client_actors": 1,
                "runtime.max_client_retries": 0, "runtime.storage": str(tmp / "runs"),
                "tracking.experiment": "sweeps"},
        # good learning rates first: with 2 trials at a time, the slow one meets a filled ASHA rung
        "space": {"algorithm.lr": {"grid": [0.1, 0.05, 0.001]}},
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "max_concurrent_trials": "auto",
    }
    spec.update(over)
    path = tmp / "space.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, ray_session):
    """One 3-trial sweep; a client actor of the first trial to reach round 2 dies once. Also
    returns the sweep's progress lines, with a status line at every step of Tune's loop."""
    tmp = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    marker = tmp / "killed-once"
    ray_session["fault_file"].write_text(json.dumps({"round": 2, "client": CLIENT, "action": "exit",
                                                     "marker": str(marker)}))
    lines = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    progress = logging.getLogger("fedplatform.sweep")
    progress.addHandler(handler)
    progress.setLevel(logging.INFO)
    every, fedplatform.tune.progress.STATUS_EVERY_S = fedplatform.tune.progress.STATUS_EVERY_S, 0
    try:
        result = run_sweep(write_space(tmp), tracking_uri=uri)
    finally:
        ray_session["fault_file"].unlink(missing_ok=True)
        progress.removeHandler(handler)
        fedplatform.tune.progress.STATUS_EVERY_S = every
    return result, MlflowClient(uri), marker, lines


CLIENT, ROUND1_CLIENT = first_client(2), first_client(1)


def test_sweep_completes_with_one_row_per_trial(sweep):
    result, _, _, _ = sweep
    assert len(result.rows) == 3
    assert all(r["status"] in ("finished", "stopped early") for r in result.rows)
    assert "algorithm.lr" in result.table() and "accuracy" in result.table()


def test_mlflow_holds_one_parent_and_a_child_per_trial_with_per_round_metrics(sweep):
    result, client, _, _ = sweep
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["fedplatform.kind"] == "sweep" and parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"sweep_summary.csv", "space.yaml", "base_config.yaml", "accuracy_vs_algorithm_lr.png"} <= artifacts
    kids = _child_runs(client, result.parent_run_id)
    assert sorted(k.info.run_id for k in kids) == sorted(r["mlflow_run_id"] for r in result.rows)
    for kid, row in ((k, next(r for r in result.rows if r["mlflow_run_id"] == k.info.run_id)) for k in kids):
        steps = [m.step for m in client.get_metric_history(kid.info.run_id, "accuracy")]
        assert steps == list(range(1, row["rounds_run"] + 1))  # once per round, none repeated
        assert float(kid.data.params["algorithm.lr"]) == row["algorithm.lr"]


def test_the_sweep_says_when_each_trial_starts_fails_and_ends(sweep):
    result, *_, lines = sweep
    for row in result.rows:
        mine = [line.removeprefix(f"trial {row['trial']} (lr={row['algorithm.lr']:.4g}) ") for line in lines
                if line.startswith(f"trial {row['trial']} ")]
        assert mine[0].startswith("started (")
        end = "finished" if row["status"] == "finished" else f"stopped early at round {row['rounds_run']} of 3"
        assert mine[-1].startswith(f"{end}, accuracy {row['accuracy']:.4f} (")
    assert [line for line in lines if line.startswith("trial ")][-1].endswith("(3 of 3 ended)")
    status = [re.fullmatch(r"sweep: (\d) of 3 trials ended, (\d) running \(at rounds ([\d/, ]+)\)"
                           r"(; best accuracy so far (\S+) \(trial (\S+)\))?", line) for line in lines
              if line.startswith("sweep: ")]
    assert status and all(status)
    for m in status:  # "r/3" for each running trial
        rounds = [tuple(map(int, at.split("/"))) for at in m[3].split(", ")]
        assert len(rounds) == int(m[2]) and all(r <= 3 and of == 3 for r, of in rounds)
    assert status[-1][6] in {r["trial"] for r in result.rows}  # the best so far, once a trial reported
    # the trial whose client died: its failure, then the same trial going on
    [failed] = [line for line in lines if "Tune restarts it" in line]
    assert "ClientError" in failed and "in round 2" in failed


def test_asha_stops_some_trials_early(sweep):
    result, client, _, _ = sweep
    stopped = [r for r in result.rows if r["status"] == "stopped early"]
    assert stopped and len(stopped) < len(result.rows)
    for r in stopped:  # a stop is not a failure, whichever of Tune's SystemExit and the summary lands last
        run = client.get_run(r["mlflow_run_id"])
        assert run.info.status == "KILLED" and "error" not in run.data.tags


def test_two_trials_run_concurrently_on_four_cpus(sweep):
    result, client, _, _ = sweep
    spans = sorted((k.info.start_time, k.info.end_time) for k in _child_runs(client, result.parent_run_id))
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:]))


def test_a_trial_whose_client_died_restarts_from_its_last_round(sweep):
    result, client, marker, _ = sweep
    assert marker.exists()  # an actor really died, and with max_client_retries=0 its trial failed
    # still one child run per trial, and no round logged twice (checked above): the failed trial
    # continued its own run from its checkpoint instead of starting over
    kids = _child_runs(client, result.parent_run_id)
    assert len(kids) == len(result.rows)
    assert any(r["status"] == "finished" and r["rounds_run"] == 3 for r in result.rows)
    # the failure stays on record in the run that went on, but not as how it ended
    assert ["ClientError" in k.data.tags.get("resumed_after_error", "") for k in kids].count(True) == 1
    assert not any("error" in k.data.tags for k in kids)


def test_a_trial_in_the_process_of_an_earlier_trial_gives_the_numbers_of_a_fresh_run(tmp_path):
    """Tune hands a trial the process of one that ended (reuse_actors): nothing the first run left
    in that process (torch's generators, caches, module state) may change the second's numbers.
    The trials' MLflow output is as quiet as the CLI's though this sweep comes from the Python API."""
    from fedplatform.config import load_config
    from fedplatform.experiment import run_experiment

    from quickstart_helpers import weights_digest

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_sweep(write_space(tmp_path, space={"algorithm.lr": {"grid": [0.05]}}, seeds=[1, 2],
                                   scheduler={"name": "fifo"}, max_concurrent_trials=1), tracking_uri=uri)
    pids = {int(json.loads(line)["pid"]) for f in Path(result.path, "tune").glob("*/result.json")
            for line in f.read_text().splitlines()}
    assert len(pids) == 1  # both trials ran in one process: the second reused the first's
    # ... whose output (Ray's worker log) has no MLflow INFO lines or progress bars, as the CLI's
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    output = "".join(f.read_text() for f in logs.glob(f"worker-*-{pids.pop()}.*"))
    assert ":actor_name:run_trial" in output
    assert "INFO mlflow" not in output and "Downloading artifacts" not in output
    second = next(r for r in result.rows if r["seed"] == 2)
    [trial_dir] = (tmp_path / "runs").glob(f"*/{second['mlflow_run_id']}")
    cfg = load_config(QUICKSTART, ["rounds=3", "algorithm.local_epochs=1", "runtime.num_client_actors=1",
                                   f"runtime.storage={tmp_path / 'fresh'}", "algorithm.lr=0.05", "seed=2"])
    fresh = run_experiment(cfg, tracking_uri=f"sqlite:///{tmp_path / 'fresh.db'}", progress=False)
    assert weights_digest(str(trial_dir)) == weights_digest(fresh.run_dir)
    assert second["accuracy"] == fresh.history[-1]["accuracy"]


def test_space_key_that_is_not_a_config_key_is_one_clear_error(tmp_path):
    path = write_space(tmp_path, space={"algorithm.learning_rate": {"choice": [0.1]}})
    with pytest.raises(ConfigError, match=r"space key 'algorithm.learning_rate'.*unknown key"):
        run_sweep(path, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    assert not (tmp_path / "runs").exists()


def test_grid_values_under_optuna_are_rejected(tmp_path):
    path = write_space(tmp_path, searcher="optuna")
    with pytest.raises(ConfigError, match="grid values are not allowed with searcher: optuna"):
        run_sweep(path, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")


def test_optuna_searcher_draws_its_trials_within_the_space(tmp_path):
    path = write_space(tmp_path, searcher="optuna", num_samples=2, seed=0, scheduler={"name": "fifo"},
                       space={"algorithm.lr": {"loguniform": [0.01, 0.2]}})
    result = run_sweep(path, ["rounds=1"], tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    assert [r["status"] for r in result.rows] == ["finished", "finished"]
    lrs = [r["algorithm.lr"] for r in result.rows]
    assert all(0.01 <= lr <= 0.2 for lr in lrs) and lrs[0] != lrs[1]


def test_optuna_searcher_without_optuna_installed_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna -> ImportError
    path = write_space(tmp_path, searcher="optuna", space={"algorithm.lr": {"choice": [0.1]}})
    with pytest.raises(UserError, match=r"searcher: optuna needs the optuna package; install it with "
                                        r"pip install 'fedplatform\[optuna\]'"):
        run_sweep(path, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    assert not (tmp_path / "m.db").exists()


def test_unknown_sweep_key_is_rejected(tmp_path):
    path = write_space(tmp_path, samples=3)
    with pytest.raises(ConfigError, match="unknown key 'samples'"):
        run_sweep(path, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")


def test_trial_needing_more_than_the_cluster_names_the_arithmetic(tmp_path):
    path = write_space(tmp_path)
    with pytest.raises(UserError, match=r"CPU: 1 \(server\) \+ 6 x 1 \(client actors\) = 7 needed, "
                                        r"the Ray cluster has 4"):
        run_sweep(path, ["runtime.num_client_actors=6"], tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")


def test_unreachable_tracking_server_fails_before_any_trial(tmp_path):
    path = write_space(tmp_path)
    with pytest.raises(UserError, match="tracking server 'http://127.0.0.1:9' cannot be reached"):
        run_sweep(path, tracking_uri="http://127.0.0.1:9")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("space, overrides, message", [
    ({"data.imbalance_factor": {"grid": [10, 50]}}, ["data.dataset=cifar10", "data.root=/nonexistent/cifar10"],
     "no CIFAR-10 data under data.root='/nonexistent/cifar10'"),
    ({"model.name": {"grid": ["small_cnn", "resnet9"]}}, [], "model.name='resnet9' is not a known model"),
    ({"algorithm.lr": {"grid": [0.1]}}, ["algorithm.name=clip2fl", "model.name=small_cnn_512",
                                          "clip.model=ViT-B-32", "clip.pretrained=openai"],
     "CLIP weights ViT-B-32/openai are not in the local cache"),
])
def test_what_a_trial_would_fail_on_is_one_error_before_anything_starts(tmp_path, monkeypatch, space, overrides,
                                                                        message):
    monkeypatch.setenv("FEDPLATFORM_OFFLINE", "1")
    path = write_space(tmp_path, space=space)
    with pytest.raises(UserError, match=message):
        run_sweep(path, overrides, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "m.db").exists()


def test_a_sweep_whose_every_trial_failed_is_a_failure(tmp_path, ray_session):
    from fedplatform.errors import RunFailed

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # one trial is enough (each costs a trainable and two actors): it is every trial of the sweep
    path = write_space(tmp_path, space={"algorithm.lr": {"grid": [0.1]}}, scheduler={"name": "fifo"},
                       max_failures=0)
    ray_session["fault_file"].write_text(json.dumps({"round": 1, "client": ROUND1_CLIENT, "action": "raise"}))
    try:
        with pytest.raises(RunFailed, match=r"the one trial of sweep 'space' failed with ClientError: "
                                            r"client \d+ failed in round 1\..* RuntimeError: injected failure"):
            run_sweep(path, tracking_uri=uri)
    finally:
        ray_session["fault_file"].unlink(missing_ok=True)
    client = MlflowClient(uri)
    [parent] = client.search_runs([client.get_experiment_by_name("sweeps").experiment_id],
                                  filter_string="tags.`fedplatform.kind` = 'sweep'")
    assert parent.info.status == "FAILED"


def test_quickstart_sweep_file_is_valid():
    from fedplatform.tune.space import build_base, check_space, load_spec

    path = REPO / "tune_spaces" / "quickstart_sweep.yaml"
    spec = load_spec(path)
    raw, _ = build_base(spec, path, [])
    check_space(spec, raw, path)


@pytest.mark.parametrize("space", sorted((REPO / "tune_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_space_validates_against_its_pipeline(space):
    from fedplatform.tune.space import build_base, check_space, load_spec

    spec = load_spec(space)
    raw, _ = build_base(spec, space, [])
    check_space(spec, raw, space)


def test_every_trial_run_ends_finished_or_killed_and_finished_ones_keep_their_artifacts(sweep):
    result, client, _, _ = sweep
    for run in _child_runs(client, result.parent_run_id):
        assert run.info.status in ("FINISHED", "KILLED") and run.info.end_time is not None
        if run.info.status == "FINISHED":
            assert "summary.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_a_sweep_interrupted_with_ctrl_c_continues_with_resume(tmp_path, ray_session):
    import ray

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # trial rounds=1 finishes; trial rounds=2 checkpoints round 1, then hangs in round 2 until interrupted
    path = write_space(tmp_path, space={"rounds": {"grid": [1, 2]}}, scheduler={"name": "fifo"})
    ray_session["fault_file"].write_text(json.dumps({"round": 2, "client": CLIENT, "action": "hang",
                                                     "seconds": 600}))
    # the session's Ray; Tune copies its results (result.json) to the sweep directory every second, not every 10
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address, TUNE_GLOBAL_CHECKPOINT_S="1")
    proc = subprocess.Popen([sys.executable, "-m", "fedplatform.cli", "sweep", str(path), "--tracking-uri", uri],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        # both trials' round 1 reached Tune (it writes result.json after taking a report and its checkpoint)
        while sum(len(p.read_text().splitlines()) for p in tmp_path.glob("runs/sweeps/*/tune/*/result.json")) < 2:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the sweep never got to round 1 of both trials"
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        out, err = proc.communicate(timeout=120)
    finally:
        ray_session["fault_file"].unlink(missing_ok=True)
        proc.kill()
    assert proc.returncode == 130, err
    assert f"interrupted; continue with `fedplatform sweep {path} --tracking-uri {uri} --resume`" in err
    assert "MLflow parent run" not in out  # no summary of a sweep that did not finish
    [sweep_dir] = (tmp_path / "runs" / "sweeps").iterdir()
    parent_id = json.loads((sweep_dir / "fedplatform_sweep.json").read_text())["parent_run_id"]
    client = MlflowClient(uri)
    assert client.get_run(parent_id).info.status == "KILLED"
    before = {k.info.run_id: k for k in _child_runs(client, parent_id)}
    assert sorted((k.data.params["rounds"], k.info.status) for k in before.values()) == [
        ("1", "FINISHED"), ("2", "KILLED")]
    # a trial attempt left RUNNING by a sweep driver killed outright (SIGKILL): no trial goes on with it
    orphan = client.create_run(client.get_run(parent_id).info.experiment_id,
                               tags={"mlflow.parentRunId": parent_id}).info.run_id

    result = run_sweep(path, tracking_uri=uri, resume=True)
    assert client.get_run(orphan).info.status == "KILLED"
    assert result.parent_run_id == parent_id and result.path == str(sweep_dir)
    assert client.get_run(parent_id).info.status == "FINISHED"
    assert sorted((r["status"], r["rounds_run"]) for r in result.rows) == [("finished", 1), ("finished", 2)]
    after = {k.info.run_id: k for k in _child_runs(client, parent_id) if k.info.run_id != orphan}
    assert after.keys() == before.keys()  # each trial kept its one run: none started over
    for run_id, kid in after.items():
        rounds = int(kid.data.params["rounds"])
        assert kid.info.status == "FINISHED"
        # the interrupted trial went on from its round-1 checkpoint: no round logged twice
        assert [m.step for m in client.get_metric_history(run_id, "accuracy")] == list(range(1, rounds + 1))
        if rounds == 1:  # finished before the interrupt: the resume left it alone
            assert kid.info.end_time == before[run_id].info.end_time
    with pytest.raises(UserError, match="sweep named 'space' .* finished; run it without --resume"):
        run_sweep(path, tracking_uri=uri, resume=True)  # nothing left to resume


def test_resume_with_no_interrupted_sweep_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", str(write_space(tmp_path)), "--resume"]) == 2
    root = tmp_path / "runs" / "sweeps"
    assert capsys.readouterr().err == f"error: --resume: no interrupted sweep named 'space' under '{root}'\n"
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def _fake_run(runs_dir: Path, run_id: str, round: int) -> Path:
    run = runs_dir / run_id
    run.mkdir(parents=True)
    (run / "checkpoint.json").write_text(json.dumps({"round": round, "run_id": run_id}))
    return run


@pytest.mark.parametrize("tune_round, local, expected", [
    (None, [("a", 2)], ("a", 2, False)),               # Tune lost every checkpoint: the run dir goes on
    (1, [("a", 3)], ("a", 3, False)),                  # Tune's copy lags the run dir: not overwritten
    (2, [], ("a", 2, True)),                           # a fresh node: Tune's copy is restored
    (2, [("a", 1)], ("a", 2, True)),                   # a stale run dir is replaced by Tune's copy
    (None, [("a", 2), ("b", 1)], ("a", 2, False)),     # an attempt that started over lags behind
    (None, [], None),                                  # nothing anywhere: start from round 1
])
def test_a_restarted_trial_goes_on_from_the_latest_of_tunes_checkpoint_and_its_run_dirs(
        tmp_path, monkeypatch, tune_round, local, expected):
    from ray import tune

    from fedplatform.tune import trial

    runs_dir = tmp_path / "trial"
    checkpoint = None
    if tune_round is not None:
        checkpoint = tune.Checkpoint.from_directory(str(_fake_run(tmp_path / "tune", "a", tune_round)))
    monkeypatch.setattr(tune, "get_checkpoint", lambda: checkpoint)
    for run_id, round in local:
        _fake_run(runs_dir, run_id, round)
    found, tune_has_it = trial._resume_dir(runs_dir)
    if expected is None:
        assert found is None and not tune_has_it
    else:
        assert (os.path.basename(found), trial._saved_round(found), tune_has_it) == expected
        assert os.path.dirname(found) == str(runs_dir)
