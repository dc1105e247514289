"""`fedplatform run` as a user types it: a real subprocess, offline, its own local Ray."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def fedplatform(*args, cwd):
    """The CLI in a subprocess, offline (no download is ever tried, network or not)."""
    return subprocess.run([sys.executable, "-m", "fedplatform.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, FEDPLATFORM_OFFLINE="1"))


def user_env() -> dict:
    """The environment a user's shell gives: offline, and without the RAY_AUTH_MODE that a session
    Ray started earlier in this pytest process set (Ray says more when it is unset)."""
    return {**{k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}, "FEDPLATFORM_OFFLINE": "1"}


def descendants(pid: int) -> set[int]:
    """Every process below `pid` now (Linux /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            pass
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process tree from /proc")
def test_run_quickstart_finishes_offline_prints_its_summary_and_leaves_no_process_behind(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "fedplatform.cli", "run", str(ROOT / "pipelines/quickstart.yaml"),
                             "--set", "rounds=3"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=user_env())
    seen: set[int] = set()
    while proc.poll() is None:  # Ray's daemons, its workers and their helpers, as they come
        seen |= descendants(proc.pid)
        time.sleep(0.2)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr
    assert "final_accuracy" in stdout
    # the command's own lines only: no MLflow set-up lines or progress bars, no notice from Ray
    for noise in (" INFO ", " WARNING ", "Downloading artifacts", "Token authentication"):
        assert noise not in stderr, stderr
    assert "open the UI: fedplatform ui --tracking-uri sqlite:///mlflow.db" in stdout
    assert (tmp_path / "mlflow.db").exists()
    assert len(list((tmp_path / "fedplatform_runs").iterdir())) == 1
    assert len(seen) >= 3  # Ray's daemons and workers were seen
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(alive(p) for p in seen):
        time.sleep(0.2)
    assert not [p for p in seen if alive(p)], "processes of the command's Ray outlived it"


def test_process_start_is_when_the_process_began_not_when_it_is_asked():
    """The command's start-up metrics count from here (the interpreter's own start included)."""
    code = ("import time; t = time.perf_counter(); time.sleep(0.5); from fedplatform.cli import process_start; "
            "print(t - process_start())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) >= 0  # the process began before its first statement ran, not after the sleep


@pytest.mark.parametrize("pipeline, overrides, message", [
    ("quickstart", ["algorithm.name=nope"], "algorithm.name='nope' is not a known algorithm"),
    ("quickstart", ["clients_per_round=50"], "clients_per_round=50 exceeds partition.num_clients=10"),
    ("quickstart", ["runtime.num_client_actors=0"], "runtime.num_client_actors=0 must be >= 1 or 'auto'"),
    ("quickstart", ["model.name=resnet9"], "model.name='resnet9' is not a known model; choose one of"),
    ("quickstart_clip2fl", ["clip.model=ViT-B-32", "clip.pretrained=openai"],
     "CLIP weights ViT-B-32/openai are not in the local cache"),
    ("quickstart_fedclip", ["clip.pretrained=openai"], "clip.pretrained='openai' is not a known open_clip tag"),
])
def test_run_bad_input_is_one_line_exit_2_and_creates_no_run(tmp_path, pipeline, overrides, message):
    sets = [a for o in overrides for a in ("--set", o)]
    proc = fedplatform("run", str(ROOT / f"pipelines/{pipeline}.yaml"), *sets, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {proc.stderr.strip().removeprefix('error: ')}"]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "fedplatform_runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_ctrl_c_prints_the_exact_resume_command_and_it_continues_the_same_run(tmp_path):
    import json
    import shlex
    import time

    from mlflow.tracking import MlflowClient

    from quickstart_helpers import first_client

    from fedplatform.runtime.actors import FAULT_ENV

    pipeline = str(ROOT / "pipelines/quickstart.yaml")
    fault = tmp_path / "fault.json"  # round 2 hangs until the interrupt
    fault.write_text(json.dumps({"round": 2, "client": first_client(2), "action": "hang", "seconds": 600}))
    proc = subprocess.Popen([sys.executable, "-m", "fedplatform.cli", "run", pipeline, "--set", "rounds=4"],
                            cwd=tmp_path, env=dict(os.environ, **{FAULT_ENV: str(fault)}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not list(tmp_path.glob("fedplatform_runs/*/checkpoint.json")):  # round 1 is saved
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    [run_dir] = (tmp_path / "fedplatform_runs").iterdir()
    assert proc.returncode == 130, err
    command = f"fedplatform run {pipeline} --set rounds=4 --resume {run_dir.name}"
    assert f"interrupted; continue with `{command}`" in err
    assert f"MLflow run {run_dir.name}, checkpoints in fedplatform_runs/{run_dir.name}" in err  # said at the start
    client = MlflowClient("sqlite:///" + str(tmp_path / "mlflow.db"))
    assert client.get_run(run_dir.name).info.status == "KILLED"

    again = fedplatform(*shlex.split(command)[1:], cwd=tmp_path)  # no fault this time
    assert again.returncode == 0, again.stderr
    assert client.get_run(run_dir.name).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_dir.name, "accuracy")] == [1, 2, 3, 4]


def test_sigkill_right_after_a_rounds_line_loses_nothing_that_line_reported(tmp_path):
    """Metrics and checkpoints are written off the critical path, but a round's line is printed only
    once both are: killed at once after it, the round is in MLflow and in the checkpoint."""
    import json

    from mlflow.tracking import MlflowClient

    proc = subprocess.Popen([sys.executable, "-m", "fedplatform.cli", "run", str(ROOT / "pipelines/quickstart.yaml"),
                             "--set", "rounds=8"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env=dict(os.environ, FEDPLATFORM_OFFLINE="1"))
    try:
        for line in proc.stderr:
            if line.startswith("round 3/8"):
                os.killpg(proc.pid, signal.SIGKILL)  # the driver, its Ray and its actors, at once
                break
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    [run_dir] = (tmp_path / "fedplatform_runs").iterdir()
    ckpt = json.loads((run_dir / "checkpoint.json").read_text())
    assert ckpt["round"] >= 3 and (run_dir / ckpt["state_file"]).exists()
    steps = [m.step for m in MlflowClient("sqlite:///" + str(tmp_path / "mlflow.db"))
             .get_metric_history(run_dir.name, "accuracy")]
    assert steps[:3] == [1, 2, 3]


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
