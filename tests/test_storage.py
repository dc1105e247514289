"""Shared storage (runtime.storage): the same checkpoints, run and sweep state on a local path and on an
S3 endpoint (moto's server on localhost); a brand-new driver with nothing local resumes from S3 alone."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from quickstart_helpers import QUICKSTART, first_client

from fedplatform import storage
from fedplatform.cli import main
from fedplatform.config import load_config
from fedplatform.errors import UserError
from fedplatform.runtime import checkpoint as ckpt_io

BUCKET = "fedplatform-storage-test"


@pytest.fixture(scope="module")
def s3():
    """A local S3 endpoint with one bucket; AWS_* in this process and in the subprocesses it starts."""
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
                           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            mp.setenv(key, value)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        storage._filesystem.cache_clear()  # no filesystem of another endpoint for this bucket
        yield f"s3://{BUCKET}"
        storage._filesystem.cache_clear()
    server.stop()


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return f"{request.getfixturevalue('s3')}/{tmp_path.name}"


def test_files_round_trip_and_list(root):
    a, b = storage.join(root, "d", "a.bin"), storage.join(root, "d", "sub", "b.txt")
    storage.write_bytes(a, b"\x00\x01")
    storage.write_bytes(b, b"hello")
    assert storage.read_bytes(a) == b"\x00\x01" and storage.is_file(b)
    assert storage.list_dir(storage.join(root, "d")) == ["a.bin", "sub"]
    assert storage.list_dir(storage.join(root, "missing")) == []
    assert storage.mtime(a) > time.time() - 600
    storage.delete(storage.join(root, "d"))
    assert not storage.exists(a) and not storage.exists(b)


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.arange(5)}


def test_checkpoint_save_find_load_round_trip_keeps_only_the_latest_state(root):
    run_dir = storage.join(root, "run1")
    for r in (1, 2):
        ckpt_io.save(run_dir, ckpt_io.Checkpoint(r, "run1", {"pos": r}, {"rounds": 3}, "fp"), _state(r))
    assert ckpt_io.find_run_dir(root, "run1") == run_dir
    assert ckpt_io.find_run_dir("elsewhere", run_dir) == run_dir  # a run directory given as such
    ckpt, state = ckpt_io.load(run_dir)
    assert (ckpt.round, ckpt.sampler, ckpt.state_file) == (2, {"pos": 2}, "state-r00002.safetensors")
    assert all(torch.equal(state[k], v) for k, v in _state(2).items())
    assert storage.list_dir(run_dir) == ["checkpoint.json", "state-r00002.safetensors"]
    with pytest.raises(UserError, match="--resume nope: no checkpoint found"):
        ckpt_io.find_run_dir(root, "nope")


def test_a_restarted_trial_on_s3_goes_on_from_the_shared_run_dir_that_tunes_marker_names(s3, tmp_path, monkeypatch):
    from ray import tune

    from fedplatform.tune import trial

    runs_dir = f"{s3}/{tmp_path.name}/trial"
    for run_id, r in (("a", 2), ("b", 1)):  # "b": an attempt that started over and lags behind
        storage.write_bytes(storage.join(runs_dir, run_id, "checkpoint.json"),
                            json.dumps({"round": r, "run_id": run_id}).encode())
    marker = tmp_path / "tune"  # what the trial reports to Tune on a URI storage: checkpoint.json alone
    marker.mkdir()
    (marker / "checkpoint.json").write_text(json.dumps({"round": 2, "run_id": "a"}))
    monkeypatch.setattr(tune, "get_checkpoint", lambda: tune.Checkpoint.from_directory(str(marker)))
    assert trial._resume_dir(runs_dir) == (storage.join(runs_dir, "a"), True)


def test_sweep_dirs_are_ordered_by_their_timestamped_names(s3, tmp_path):
    from fedplatform.tune.sweep import SWEEP_STATE, _sweep_dirs

    root = f"{s3}/{tmp_path.name}/sweeps"
    for name in ("q-20261203-150138", "q-20261203-150137x", "q-20261203-150137", "q-long-20261203-160000",
                 "q-20261203-170000"):
        if name != "q-20261203-170000":  # a sweep whose state was never written is no sweep
            storage.write_bytes(storage.join(root, name, SWEEP_STATE), b"{}")
        storage.write_bytes(storage.join(root, name, "tune", "x"), b"")
    assert [os.path.basename(d) for d in _sweep_dirs(root, "q")] == [
        "q-20261203-150137", "q-20261203-150137x", "q-20261203-150138"]


def test_storage_default_comes_from_the_environment_and_the_flag_wins(tmp_path, monkeypatch):
    from fedplatform.cli import _overrides, build_parser
    from fedplatform.tune.space import build_base, load_spec

    monkeypatch.setenv("FEDPLATFORM_STORAGE", "s3://from-env/runs")
    assert load_config(QUICKSTART).runtime.storage == "s3://from-env/runs"
    args = build_parser().parse_args(["run", str(QUICKSTART), "--set", "runtime.storage=s3://from-set/runs",
                                      "--storage", "s3://from-flag/runs"])
    assert load_config(QUICKSTART, _overrides(args)).runtime.storage == "s3://from-flag/runs"
    space = tmp_path / "space.yaml"  # a sweep hands the URI to its trials as it is (no path resolution)
    space.write_text(yaml.safe_dump({"base": str(QUICKSTART), "space": {"algorithm.lr": {"grid": [0.1]}}}))
    assert build_base(load_spec(space), space, [])[1].runtime.storage == "s3://from-env/runs"
    monkeypatch.delenv("FEDPLATFORM_STORAGE")
    assert build_base(load_spec(space), space, [])[1].runtime.storage == str(Path("fedplatform_runs").resolve())


def test_mlflow_artifacts_go_beside_the_runs_unless_a_tracking_server_decides():
    from fedplatform.tracking.mlflow_run import artifact_location

    assert artifact_location("sqlite:////x/mlflow.db", "s3://b/runs", "exp") == "s3://b/runs/mlflow/exp"
    assert artifact_location("http://head:5000", "s3://b/runs", "exp") is None
    assert artifact_location("sqlite:////x/mlflow.db", "/nfs/runs", "exp") is None


@pytest.mark.parametrize("command", ["run", "sweep"])
@pytest.mark.parametrize("uri, message", [
    ("foo://bucket/runs", "storage 'foo://bucket/runs' cannot be opened"),
    (f"s3://no-{BUCKET}/runs", f"storage 's3://no-{BUCKET}/runs' is not writable \\(Bucket 'no-{BUCKET}' not found"),
])
def test_unusable_storage_is_one_line_exit_2_before_anything_starts(s3, tmp_path, monkeypatch, capsys, command,
                                                                      uri, message):
    monkeypatch.chdir(tmp_path)
    target = QUICKSTART
    if command == "sweep":
        target = tmp_path / "space.yaml"
        target.write_text(yaml.safe_dump({"base": str(QUICKSTART), "space": {"algorithm.lr": {"grid": [0.1]}}}))
    assert main([command, str(target), "--storage", uri]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "mlflow.db").exists()


# ---------------------------------------------------------------------------- a new head resumes from S3

def _fresh_head_env(s3_env: dict, cache: Path, ray_tmp: Path, **extra) -> dict:
    """A driver with its own Ray (temp dir `ray_tmp`) and data cache, reaching S3, offline."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "FEDPLATFORM_FAULT_FILE")}
    return dict(env, **s3_env, FEDPLATFORM_OFFLINE="1", FEDPLATFORM_CACHE=str(cache), RAY_TMPDIR=str(ray_tmp),
                TUNE_GLOBAL_CHECKPOINT_S="1", **extra)


def _s3_env() -> dict:
    return {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                       "AWS_DEFAULT_REGION")}


def _files_under(location: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, path = storage.resolve(location)
    return [i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
            if i.type == pafs.FileType.File]


def _runs_on_storage(root: str) -> dict[str, tuple[ckpt_io.Checkpoint, dict]]:
    """{run id: (checkpoint, state)} of every run directory under root (trial dirs included)."""
    found = {}
    for path in _files_under(root):
        if path.endswith("/checkpoint.json") and "/sweeps/" not in path:
            run_dir = "s3://" + path.removesuffix("/checkpoint.json")
            found[os.path.basename(run_dir)] = ckpt_io.load(run_dir)
    return found


# The experiment both tests below interrupt and resume (2 rounds in all): one uninterrupted reference serves both.
REFERENCE = ("algorithm.local_epochs=1", "runtime.num_client_actors=1", "rounds=2", "algorithm.lr=0.1")


@pytest.fixture(scope="module")
def reference_state(tmp_path_factory, ray_session) -> dict:
    """The final weights of the REFERENCE experiment run uninterrupted here, on local storage."""
    from fedplatform.experiment import run_experiment

    tmp = tmp_path_factory.mktemp("reference")
    cfg = load_config(QUICKSTART, [*REFERENCE, f"runtime.storage={tmp / 'runs'}"])
    result = run_experiment(cfg, tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}", progress=False)
    return ckpt_io.load(result.run_dir)[1]


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _short_tmp(name: str) -> Path:
    """Ray's unix sockets need a short temp dir path."""
    return Path(tempfile.mkdtemp(prefix=f"fp-{name}-"))


@pytest.mark.cluster
def test_a_sweep_on_s3_resumes_on_a_brand_new_head_and_ends_as_if_never_interrupted(s3, tmp_path, reference_state):
    root = f"{s3}/sweep-test"
    keep = tmp_path / "keep"  # the MLflow store outlives the head (a server in the cloud)
    keep.mkdir()
    uri = f"sqlite:///{keep / 'mlflow.db'}"
    space = keep / "space.yaml"  # the user's own file, as in their checkout
    space.write_text(yaml.safe_dump({
        "base": str(QUICKSTART), "scheduler": {"name": "fifo"},
        "set": {"rounds": 2, "algorithm.local_epochs": 1, "runtime.num_client_actors": 1,
                "runtime.server_resources": {"num_cpus": 0.5}, "runtime.client_resources": {"num_cpus": 0.5},
                "tracking.experiment": "s3sweep"},
        "space": {"algorithm.lr": {"grid": [0.1]}},  # one trial, away from the pipeline's lr=0.05
    }))
    fault = keep / "fault.json"  # round 2 hangs until the interrupt
    fault.write_text(json.dumps({"round": 2, "client": first_client(2), "action": "hang", "seconds": 600}))
    old = {name: tmp_path / name for name in ("work", "cache")} | {"ray": _short_tmp("ray")}
    old["work"].mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedplatform.cli", "sweep", str(space), "--tracking-uri", uri, "--storage", root],
        cwd=old["work"], env=_fresh_head_env(_s3_env(), old["cache"], old["ray"], FEDPLATFORM_FAULT_FILE=str(fault)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        # the trial's round 1 reached Tune: its checkpoint (marker) is on S3
        while not any(re.search(r"/checkpoint_\d+/checkpoint\.json$", p) for p in _files_under(f"{root}/sweeps")):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the sweep never got to round 1 of its trial"
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert f"continue with `fedplatform sweep {space} --tracking-uri {uri} --storage {root} --resume`" in err
    for path in old.values():  # the old head is gone: nothing local is left but the MLflow store
        shutil.rmtree(path)

    new = {name: tmp_path / name for name in ("work2", "cache2")} | {"ray": _short_tmp("ray2")}
    new["work2"].mkdir()
    again = subprocess.run(
        [sys.executable, "-m", "fedplatform.cli", "sweep", str(space), "--tracking-uri", uri, "--storage", root,
         "--resume"], cwd=new["work2"], env=_fresh_head_env(_s3_env(), new["cache2"], new["ray"]),
        capture_output=True, text=True, timeout=600)
    shutil.rmtree(new["ray"], ignore_errors=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"summary and plots in {root}/sweeps/space-" in again.stdout
    assert not (new["work2"] / "fedplatform_runs").exists()  # nothing went to the new head's disk

    [(run_id, (ckpt, state))] = _runs_on_storage(root).items()
    assert (ckpt.round, ckpt.config["algorithm"]["lr"]) == (2, 0.1)
    assert_same_state(state, reference_state)
    client = MlflowClient(uri)
    run = client.get_run(run_id)  # the trial went on in its own run, no round logged twice
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "accuracy")] == [1, 2]
    assert run.info.artifact_uri == f"{root}/mlflow/s3sweep/{run_id}/artifacts"
    assert storage.is_file(f"{run.info.artifact_uri}/model.safetensors")
    [sweep_dir] = storage.list_dir(f"{root}/sweeps")
    assert {"fedplatform_sweep.json", "sweep_summary.csv", "plots", "tune"} <= set(
        storage.list_dir(f"{root}/sweeps/{sweep_dir}"))


@pytest.mark.cluster
def test_a_run_on_s3_resumes_on_a_brand_new_head_and_equals_the_uninterrupted_run(s3, tmp_path, reference_state):
    from fedplatform.experiment import run_experiment

    root = f"{s3}/run-test"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = [s for s in REFERENCE if not s.startswith("rounds=")] + ["tracking.experiment=s3run"]
    first = run_experiment(load_config(QUICKSTART, [*sets, "rounds=1", f"runtime.storage={root}"]),
                           tracking_uri=uri, progress=False)
    assert first.run_dir == f"{root}/{first.run_id}"

    work, cache, ray_tmp = tmp_path / "new-head", tmp_path / "cache", _short_tmp("ray3")
    work.mkdir()
    again = subprocess.run(
        [sys.executable, "-m", "fedplatform.cli", "run", str(QUICKSTART), *(a for s in sets for a in ("--set", s)),
         "--set", "rounds=2", "--tracking-uri", uri, "--storage", root, "--resume", first.run_id],
        cwd=work, env=_fresh_head_env(_s3_env(), cache, ray_tmp), capture_output=True, text=True, timeout=600)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"MLflow run {first.run_id}; checkpoints in {root}/{first.run_id}" in again.stdout

    ckpt, state = ckpt_io.load(f"{root}/{first.run_id}")
    assert ckpt.round == 2
    assert_same_state(state, reference_state)
    client = MlflowClient(uri)
    assert [m.step for m in client.get_metric_history(first.run_id, "accuracy")] == [1, 2]
    artifacts = f"{root}/mlflow/s3run/{first.run_id}/artifacts"
    assert client.get_run(first.run_id).info.artifact_uri == artifacts
    assert storage.is_file(f"{artifacts}/model.safetensors") and storage.is_file(f"{artifacts}/config.yaml")
