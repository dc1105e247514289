"""`fedplatform run` as a user types it: a real subprocess, offline, its own local Ray."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def fedplatform(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fedplatform.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_run_quickstart_finishes_offline_and_prints_its_summary(tmp_path):
    proc = fedplatform("run", str(ROOT / "pipelines/quickstart.yaml"), "--set", "rounds=3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "final_accuracy" in proc.stdout
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in proc.stdout
    assert (tmp_path / "mlflow.db").exists()
    assert len(list((tmp_path / "fedplatform_runs").iterdir())) == 1


@pytest.mark.parametrize("override, message", [
    ("algorithm.name=nope", "algorithm.name='nope' is not a known algorithm"),
    ("clients_per_round=50", "clients_per_round=50 exceeds partition.num_clients=10"),
    ("runtime.num_client_actors=0", "runtime.num_client_actors=0 must be >= 1 or 'auto'"),
])
def test_run_bad_input_is_one_line_exit_2_and_creates_no_run(tmp_path, override, message):
    proc = fedplatform("run", str(ROOT / "pipelines/quickstart.yaml"), "--set", override, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {proc.stderr.strip().removeprefix('error: ')}"]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "fedplatform_runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_resume_of_unknown_run_is_one_line_exit_2(tmp_path):
    proc = fedplatform("run", str(ROOT / "pipelines/quickstart.yaml"), "--resume", "missing-run", cwd=tmp_path)
    assert proc.returncode == 2
    assert "--resume missing-run: no checkpoint found" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
