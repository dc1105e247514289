"""`fedplatform run` as a user types it: a real subprocess, offline, its own local Ray."""
from __future__ import annotations

import os
import signal
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
    assert "open the UI: fedplatform ui --tracking-uri sqlite:///mlflow.db" in proc.stdout
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


def test_sweep_with_a_key_that_is_not_in_the_config_is_one_line_exit_2(tmp_path):
    proc = fedplatform("sweep", str(ROOT / "tune_spaces/quickstart_sweep.yaml"), "--set", "nope.x=1", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "unknown key 'nope'" in proc.stderr and "Traceback" not in proc.stderr


def test_ui_serves_the_tracking_store_on_localhost(tmp_path):
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "fedplatform.cli", "ui", "--port", str(port)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        assert f"at http://127.0.0.1:{port}" in proc.stdout.readline()
        deadline, status = time.monotonic() + 90, None
        while status is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                status = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status
            except OSError:
                time.sleep(1)
        assert status == 200
    finally:  # the server and its worker processes share the session started above
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
