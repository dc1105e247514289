"""Hostile and careless input across `run`, `data describe`, `sweep` and `cache build` (issue 15).

Every case runs the CLI in-process from a working directory that already holds one finished
quickstart run, and asserts: the exit code, exactly one `error:` line naming the problem, no
traceback, and that nothing was created or changed there (no run directory, no MLflow run: the
finished run's directory and MLflow store are byte-for-byte as before) nor beside the inputs.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedplatform.cli import main

ROOT = Path(__file__).resolve().parents[1]
Q = str(ROOT / "pipelines" / "quickstart.yaml")
CLIP2FL = str(ROOT / "pipelines" / "quickstart_clip2fl.yaml")
CIFAR_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")


def tree(*dirs: Path) -> dict[str, str]:
    """Every file under `dirs` with the sha256 of its bytes (and every folder, as '')."""
    out = {}
    for d in dirs:
        for p in sorted(d.rglob("*")):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
    return out


@pytest.fixture(scope="module")
def finished(ray_session, tmp_path_factory):
    """One finished quickstart run (2 rounds) in the working directory every case runs from."""
    work = tmp_path_factory.mktemp("work")
    old = os.getcwd()
    os.chdir(work)
    try:
        assert main(["run", Q, *sets("rounds=2", "runtime.num_client_actors=1")]) == 0
    finally:
        os.chdir(old)
    [run_dir] = (work / "fedplatform_runs").iterdir()
    assert (run_dir / "checkpoint.json").is_file() and (work / "mlflow.db").is_file()
    return work


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Evil:
    """Unpickling this creates the file `marker`: what a crafted data file or checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def write(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def pipeline(inp: Path, text: str) -> str:
    return str(write(inp / "p.yaml", text))


def space(inp: Path, text: str) -> str:
    return str(write(inp / "s.yaml", f"base: {Q}\nset: {{rounds: 1}}\n" + text))


def cifar_root(inp: Path, bad: dict[str, bytes] | None = None) -> Path:
    """A tiny CIFAR-10 in the official pickle layout, with some files replaced by `bad`."""
    d = inp / "cifar" / "cifar-10-batches-py"
    rng = np.random.default_rng(0)
    for name in CIFAR_FILES:
        obj = ({b"label_names": [f"c{i}".encode() for i in range(10)]} if name == "batches.meta" else
               {b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), b"labels": list(range(10)) * 2})
        write(d / name, (bad or {}).get(name, pickle.dumps(obj, protocol=2)))
    return d.parent


def cifar(inp: Path, bad: dict[str, bytes]) -> list[str]:
    return sets("data.dataset=cifar10", f"data.root={cifar_root(inp, bad)}")


def folders(root: Path, *patterns: str) -> Path:
    """Ten empty class folders per pattern (e.g. 'train/k{}')."""
    for pattern in patterns:
        for k in range(10):
            (root / pattern.format(k)).mkdir(parents=True)
    return root


def empty_lists(root: Path) -> Path:
    for name in ("ImageNet_LT_train.txt", "ImageNet_LT_test.txt"):
        write(root / name, "")
    return root


def alias_bomb() -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    return "\n".join(lines) + "\n"


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


# (id, argv builder given the inputs folder, exit code, what the error line must say)
CASES = [
    # ------------------------------------------------------------------ run: settings
    ("run-inf-lr", lambda i: ["run", Q, *sets("algorithm.lr=inf")], 2,
     "algorithm.lr='inf' is invalid: input should be a finite number"),
    ("run-nan-imbalance", lambda i: ["run", Q, *sets("data.imbalance_factor=.nan")], 2, "data.imbalance_factor=nan"),
    ("run-inf-timeout", lambda i: ["run", Q, *sets("runtime.round_timeout_s=.inf")], 2, "runtime.round_timeout_s=inf"),
    ("run-seed-too-big", lambda i: ["run", Q, *sets("seed=4294967296")], 2, "seed=4294967296 is invalid"),
    ("run-seed-negative", lambda i: ["run", Q, *sets("seed=-1")], 2, "seed=-1 is invalid"),
    ("run-empty-experiment", lambda i: ["run", Q, *sets("tracking.experiment=''")], 2, "tracking.experiment=''"),
    ("run-long-value-is-cut", lambda i: ["run", Q, *sets("rounds=" + "x" * 100_000)], 2, "characters)"),
    ("run-zero-rounds", lambda i: ["run", Q, *sets("rounds=0")], 2, "rounds=0 is invalid"),
    # ------------------------------------------------------------------ run: pipeline files
    ("run-empty-file", lambda i: ["run", pipeline(i, "")], 2, "is empty"),
    ("run-null-file", lambda i: ["run", pipeline(i, "null\n")], 2, "is empty"),
    ("run-empty-mapping", lambda i: ["run", pipeline(i, "{}\n")], 2, "is empty"),
    ("run-list-file", lambda i: ["run", pipeline(i, "[]\n")], 2, "must be a YAML mapping of sections"),
    ("run-list-file-with-set", lambda i: ["run", pipeline(i, "- rounds: 2\n"), *sets("rounds=3")], 2,
     "must be a YAML mapping of sections"),
    ("run-scalar-file", lambda i: ["run", pipeline(i, "hello\n")], 2, "got a str 'hello'"),
    ("run-duplicate-keys", lambda i: ["run", pipeline(i, "rounds: 2\nseed: 1\nrounds: 3\n")], 2,
     "duplicate key 'rounds' at line 3"),
    ("run-duplicate-nested-keys", lambda i: ["run", pipeline(i, "algorithm:\n  lr: 0.1\n  lr: 0.2\n")], 2,
     "duplicate key 'lr'"),
    ("run-binary-file", lambda i: ["run", str(write(i / "p.yaml", bytes(range(256)) * 4))], 2,
     "is not a UTF-8 text file"),
    ("run-directory-as-file", lambda i: ["run", str(i)], 2, "is a directory; give the YAML file itself"),
    ("run-missing-file", lambda i: ["run", str(i / "nope.yaml")], 2, "does not exist"),
    ("run-alias-bomb", lambda i: ["run", pipeline(i, alias_bomb())], 2, "expands to more than 100,000 values"),
    ("run-recursive-alias", lambda i: ["run", pipeline(i, "name: &n [1, *n]\n")], 2, "refers to itself"),
    ("run-huge-file", lambda i: ["run", pipeline(i, "#" * (2 << 20))], 2, "bytes of YAML"),
    ("run-python-tag", lambda i: ["run", pipeline(i, f"name: !!python/object/apply:os.system ['touch {i}/x']\n")],
     2, "is not valid YAML at line 1"),
    # ------------------------------------------------------------------ run: command line and environment
    ("run-empty-resume", lambda i: ["run", Q, "--resume", ""], 2, "--resume needs a run id"),
    ("run-tracking-unknown-scheme", lambda i: ["run", Q, "--tracking-uri", "ftp://host/x"], 2,
     "has unknown scheme 'ftp'"),
    ("run-tracking-no-scheme", lambda i: ["run", Q, "--tracking-uri", "mlflow.db"], 2, "has no scheme"),
    ("run-tracking-not-a-database", lambda i: ["run", Q, "--tracking-uri",
                                               f"sqlite:///{write(i / 'notes.db', 'just text')}"], 2,
     "is not an SQLite database"),
    ("run-tracking-directory", lambda i: ["run", Q, "--tracking-uri", f"sqlite:///{i}"], 2, "is a directory"),
    ("run-ray-address-nothing-there", lambda i: ["run", Q, "--ray-address", f"127.0.0.1:{closed_port()}"], 2,
     "nothing accepts connections there"),
    ("run-ray-address-not-host-port", lambda i: ["run", Q, "--ray-address", "host:port"], 2, "is not HOST:PORT"),
    ("run-storage-is-a-file", lambda i: ["run", Q, *sets(f"runtime.storage={write(i / 'f', 'x')}/runs")], 2,
     "is a file, not a folder"),
    # ------------------------------------------------------------------ run: data and checkpoints
    ("run-cifar-crafted-pickle", lambda i: ["run", Q, *cifar(i, {
        "data_batch_3": pickle.dumps({b"data": Evil(i / "PWNED")}, protocol=2)})], 2,
     "is not an official CIFAR file and was not loaded"),
    ("run-cifar-truncated", lambda i: ["run", Q, *cifar(i, {
        "test_batch": pickle.dumps({b"data": np.zeros((20, 3072), np.uint8)}, protocol=2)[:100]})], 2,
     "is corrupt or truncated"),
    ("run-archive-as-root", lambda i: ["run", Q, *sets("data.dataset=cifar10",
                                                       f"data.root={write(i / 'cifar-10-python.tar.gz', 'x')}")], 2,
     "is an archive, not a folder; extract it first (tar -xf"),
    ("run-clip-garbage-checkpoint", lambda i: ["run", CLIP2FL, *sets(f"clip.pretrained={write(i / 'w.pt', 'junk')}")],
     2, "cannot be read as a PyTorch checkpoint"),
    # ------------------------------------------------------------------ data describe
    ("describe-plot-missing-folder", lambda i: ["data", "describe", Q, "--plot", str(i / "no" / "x.png")], 2,
     "does not exist or is not writable"),
    ("describe-plot-bad-suffix", lambda i: ["data", "describe", Q, "--plot", str(i / "x.xyz")], 2,
     "unsupported image type '.xyz'"),
    ("describe-empty-file", lambda i: ["data", "describe", pipeline(i, "\n\n")], 2, "is empty"),
    ("describe-duplicate-keys", lambda i: ["data", "describe", pipeline(i, "data: {}\ndata: {}\n")], 2,
     "duplicate key 'data'"),
    ("describe-inf-imbalance", lambda i: ["data", "describe", Q, *sets("data.imbalance_factor=.inf")], 2,
     "data.imbalance_factor=inf"),
    ("describe-seed-out-of-range", lambda i: ["data", "describe", Q, *sets("seed=99999999999")], 2,
     "seed=99999999999 is invalid"),
    ("describe-scalar-with-set", lambda i: ["data", "describe", pipeline(i, "3\n"), *sets("seed=1")], 2,
     "must be a YAML mapping"),
    ("describe-cifar-crafted-meta", lambda i: ["data", "describe", Q, *cifar(i, {
        "batches.meta": pickle.dumps(Evil(i / "PWNED"), protocol=2)})], 2,
     "refers to io.open, which a CIFAR file never contains"),
    ("describe-cifar-wrong-shape", lambda i: ["data", "describe", Q, *cifar(i, {
        "data_batch_1": pickle.dumps({b"data": np.zeros((2, 5), np.uint8), b"labels": [0, 1]})})], 2, "is not an official CIFAR-10 batch"),
    ("describe-cifar-empty-class-folders", lambda i: ["data", "describe", Q, *sets(
        "data.dataset=cifar10", f"data.root={folders(i / 'c', 'train/k{}', 'test/k{}')}")], 2, "has no image files"),
    ("describe-imagenet-lt-empty-lists", lambda i: ["data", "describe", Q, *sets(
        "data.dataset=imagenet_lt", f"data.root={empty_lists(i / 'lt')}")], 2, "lists no images"),
    ("describe-domains-archive", lambda i: ["data", "describe", Q, *sets(
        "data.dataset=imagefolder_domains", f"data.root={write(i / 'PACS.zip', 'x')}")], 2, "extract it first (unzip"),
    # ------------------------------------------------------------------ sweep
    ("sweep-name-escapes", lambda i: ["sweep", space(i, "name: ../../x\nspace: {algorithm.lr: {grid: [0.1]}}\n")], 2,
     "name='../../x' cannot be a folder name"),
    ("sweep-name-absolute", lambda i: ["sweep", space(i, "name: /tmp/x\nspace: {algorithm.lr: {grid: [0.1]}}\n")], 2,
     "cannot be a folder name"),
    ("sweep-unknown-metric", lambda i: ["sweep", space(i, "metric: acuracy\nspace: {algorithm.lr: {grid: [0.1]}}\n")],
     2, "metric='acuracy' is not a metric the runs report"),
    ("sweep-uniform-over-int", lambda i: ["sweep", space(i, "space: {algorithm.local_epochs: {uniform: [1, 3]}}\n")],
     2, "space key 'algorithm.local_epochs'"),
    ("sweep-loguniform-inf", lambda i: ["sweep", space(i, "space: {algorithm.lr: {loguniform: [0.001, .inf]}}\n")],
     2, "finite number"),
    ("sweep-grid-nan", lambda i: ["sweep", space(i, "space: {algorithm.lr: {grid: [0.1, .nan]}}\n")], 2,
     "must be finite numbers"),
    ("sweep-seed-out-of-range", lambda i: ["sweep", space(i, "seed: -5\nspace: {algorithm.lr: {grid: [0.1]}}\n")], 2,
     "seed=-5 is invalid"),
    ("sweep-empty-file", lambda i: ["sweep", str(write(i / "s.yaml", ""))], 2, "search-space file"),
    ("sweep-list-file", lambda i: ["sweep", str(write(i / "s.yaml", "[]"))], 2, "must be a YAML mapping"),
    ("sweep-duplicate-keys", lambda i: ["sweep", space(i, "metric: accuracy\nmetric: loss\nspace: {}\n")], 2,
     "duplicate key 'metric'"),
    ("sweep-alias-bomb", lambda i: ["sweep", str(write(i / "s.yaml", alias_bomb()))], 2, "expands to more than"),
    ("sweep-inf-lr-in-base", lambda i: ["sweep", space(i, "space: {rounds: {grid: [1]}}\n"), *sets("algorithm.lr=inf")],
     2, "base pipeline"),
    ("sweep-tracking-unknown-scheme", lambda i: ["sweep", space(i, "space: {algorithm.lr: {grid: [0.1]}}\n"),
                                                 "--tracking-uri", "mongodb://x"], 2, "unknown scheme 'mongodb'"),
    # ------------------------------------------------------------------ cache build
    ("cache-no-clip-model", lambda i: ["cache", "build", Q], 2, "sets no clip.model"),
    ("cache-garbage-checkpoint", lambda i: ["cache", "build", CLIP2FL, *sets(
        f"clip.pretrained={write(i / 'w.pt', bytes(64))}")], 2, "cannot be read as a PyTorch checkpoint"),
    ("cache-crafted-checkpoint", lambda i: ["cache", "build", CLIP2FL, *sets(
        f"clip.pretrained={_torch_save(i / 'evil.pt', {'w': Evil(i / 'PWNED')})}")], 2,
     "cannot be read as a PyTorch checkpoint"),
    ("cache-not-tensors", lambda i: ["cache", "build", CLIP2FL, *sets(
        f"clip.pretrained={_torch_save(i / 'd.pt', {'w': 1})}")], 2, "not a mapping of tensors"),
    ("cache-missing-checkpoint", lambda i: ["cache", "build", CLIP2FL, *sets(f"clip.pretrained={i}/none.pt")], 2,
     "no such file exists"),
    ("cache-ray-address-nothing-there", lambda i: ["cache", "build", CLIP2FL, "--ray-address",
                                                   f"127.0.0.1:{closed_port()}"], 2, "nothing accepts connections"),
    ("cache-empty-file", lambda i: ["cache", "build", pipeline(i, "null")], 2, "is empty"),
    ("cache-inf-setting", lambda i: ["cache", "build", CLIP2FL, *sets("algorithm.kd_temperature=-.inf")], 2,
     "algorithm.kd_temperature=-inf"),
]


def _torch_save(path: Path, obj) -> Path:
    import torch

    torch.save(obj, path)
    return path


@pytest.mark.parametrize("argv, code, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_touches_nothing(finished, tmp_path, monkeypatch, capsys, argv, code, message):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    args = argv(inputs)
    before = tree(finished, inputs)
    monkeypatch.chdir(finished)
    assert main(args) == code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert message in errors[0]
    assert len(errors[0]) < 2500 and "Traceback" not in err and "\x1b[" not in errors[0]
    assert tree(finished, inputs) == before  # no run dir, no MLflow run, the finished run untouched
    assert not (inputs / "PWNED").exists()


def test_the_suite_covers_every_command_broadly():
    commands = [c[0].split("-")[0] for c in CASES]
    assert len(CASES) >= 40 and {c: commands.count(c) >= 5 for c in ("run", "describe", "sweep", "cache")} == \
        {"run": True, "describe": True, "sweep": True, "cache": True}


def test_a_crafted_cifar_pickle_is_refused_and_never_executes(tmp_path, capsys, monkeypatch):
    marker = tmp_path / "created-by-the-pickle"
    root = cifar_root(tmp_path, {"data_batch_1": pickle.dumps({b"data": Evil(marker), b"labels": [0]})})
    with pytest.raises(FileNotFoundError):  # the file only exists if something ran the payload
        marker.stat()
    monkeypatch.chdir(tmp_path)
    assert main(["data", "describe", Q, *sets("data.dataset=cifar10", f"data.root={root}")]) == 2
    [error] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "data_batch_1 is not an official CIFAR file and was not loaded" in error
    assert not marker.exists()
    pickle.loads(pickle.dumps(Evil(marker)))  # the same payload through plain pickle does create it
    assert marker.exists()


def test_an_official_cifar_pickle_still_loads(tmp_path):
    from fedplatform.config import DataConfig
    from fedplatform.data.sources import load_source

    data = load_source(DataConfig(dataset="cifar10", root=str(cifar_root(tmp_path))))
    assert data.train.pixels.shape == (100, 32, 32, 3) and data.class_names[0] == "c0"


def test_inf_learning_rate_fails_before_anything_starts(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedplatform.cli", "run", Q, "--set", "algorithm.lr=inf"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: algorithm.lr='inf' is invalid: input should be a finite number"]
    assert list(tmp_path.iterdir()) == []  # no run dir, no MLflow store, no Ray session here


def test_a_run_that_diverges_stops_with_the_client_and_round_and_keeps_the_last_good_checkpoint(
        ray_session, tmp_path, monkeypatch, capsys):
    """lr 0.6 on the quickstart: round 1's loss is huge but finite, round 2's is nan."""
    import json

    from mlflow.tracking import MlflowClient

    from fedplatform.runtime.checkpoint import load

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # absolute: MLflow caches stores by URI within a process
    assert main(["run", Q, *sets("algorithm.lr=0.6", "rounds=4", "runtime.num_client_actors=1"), "--tracking-uri", uri]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert re.search(r"error: client \d+ diverged in round 2: its train loss is nan", errors[0]), errors[0]
    assert "runtime.allow_nonfinite=true" in errors[0]
    [run_dir] = (tmp_path / "fedplatform_runs").iterdir()
    ckpt, state = load(run_dir)
    assert ckpt.round == 1 and json.loads((run_dir / "checkpoint.json").read_text())["round"] == 1
    assert all(bool(t.isfinite().all()) for t in state.values() if t.is_floating_point())
    run = MlflowClient(uri).get_run(run_dir.name)
    assert run.info.status == "FAILED" and "diverged in round 2" in run.data.tags["error"]


def test_allow_nonfinite_trains_on(ray_session, tmp_path, monkeypatch, capsys):
    from fedplatform.runtime.checkpoint import load

    monkeypatch.chdir(tmp_path)
    assert main(["run", Q, *sets("algorithm.lr=0.6", "rounds=2", "runtime.allow_nonfinite=true",
                                 "runtime.num_client_actors=1"),
                 "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 0
    [run_dir] = (tmp_path / "fedplatform_runs").iterdir()
    ckpt, _ = load(run_dir)
    assert ckpt.round == 2 and ckpt.history[-1]["train_loss"] != ckpt.history[-1]["train_loss"]  # nan, kept


def test_a_bug_is_reported_as_a_bug(monkeypatch, capsys):
    import fedplatform.cli as cli

    def broken(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(cli, "cmd_version", broken)
    assert main(["version"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ZeroDivisionError: division by zero - this is a bug in fedplatform")
    assert "--debug" in err and len(err.splitlines()) == 1


def test_a_user_error_inside_an_actor_is_its_one_line_and_creates_no_run(finished, monkeypatch, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    before = tree(finished)
    monkeypatch.chdir(finished)
    assert main(["run", Q, "--set", "runtime.device=cuda"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: runtime.device=cuda with num_gpus=0"), err
    assert "Traceback" not in err and "\x1b[" not in err
    assert tree(finished) == before


@pytest.mark.parametrize("argv, message", [
    (lambda ro: ["run", Q, "--set", f"runtime.storage={ro}/runs"], "is not writable; run from a writable folder"),
    (lambda ro: ["run", Q, "--tracking-uri", f"sqlite:///{ro}/mlflow.db"], "is not writable; run from a writable"),
    (lambda ro: ["sweep", space(ro.parent, "space: {algorithm.lr: {grid: [0.1]}}\n"), "--set",
                 f"runtime.storage={ro}"], "is not writable"),
], ids=["run-storage", "run-tracking-folder", "sweep-storage"])
def test_an_unwritable_folder_is_said_before_anything_starts(finished, tmp_path, monkeypatch, capsys, argv, message):
    """Permission bits do not bind root (the test machines' user), so the folder reports itself
    unwritable through os.access, which is what the checks ask."""
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != read_only and real_access(p, mode, **kw))
    args = argv(read_only)
    before = tree(finished, tmp_path)
    monkeypatch.chdir(finished)
    assert main(args) == 2
    [error] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert message in error and str(read_only) in error
    assert tree(finished, tmp_path) == before


def test_a_cluster_that_asks_for_a_token_is_said_and_nothing_is_created(finished):
    """The session's Ray uses token authentication (Ray's default for a local cluster); a process
    pointed at it by address without RAY_AUTH_MODE=token is refused by it. Ray retries for 20 s."""
    import ray

    before = tree(finished)
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    out = subprocess.run([sys.executable, "-m", "fedplatform.cli", "run", Q, "--ray-address",
                          ray.get_runtime_context().gcs_address], cwd=finished, env=env, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "asks for an authentication token" in errors[0], out.stderr
    assert "set RAY_AUTH_MODE=token" in errors[0] and "Traceback" not in out.stderr
    assert tree(finished) == before
