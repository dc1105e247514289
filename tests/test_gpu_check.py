"""The GPU check's CPU side (runs everywhere): without CUDA the `gpu` tests are skipped with their
reason, and benchmarks/gpu_check.sh (and its driver) refuse in one line with exit code 2.
CUDA_VISIBLE_DEVICES="" hides any GPU, so these hold on a GPU machine too."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_gpu import NO_CUDA

ROOT = Path(__file__).resolve().parents[1]
NO_GPU = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}


def test_gpu_tests_are_skipped_with_their_reason_without_cuda():
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-rs",
                           "-p", "no:cacheprovider"], cwd=ROOT, env=NO_GPU, capture_output=True, text=True,
                          timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out  # 5 would mean no gpu test was collected at all
    assert "3 skipped" in out.splitlines()[-1], out
    skips = [line for line in out.splitlines() if line.startswith("SKIPPED [1] tests/test_gpu.py:")]
    assert len(skips) == 3 and all(line.endswith(f": {NO_CUDA}") for line in skips), out
    assert "passed" not in out and "failed" not in out and "error" not in out.lower(), out


@pytest.mark.parametrize("command", [["bash", "benchmarks/gpu_check.sh"], [sys.executable, "benchmarks/gpu_check.py"]],
                         ids=["gpu_check.sh", "gpu_check.py"])
def test_gpu_check_refuses_to_run_without_cuda_in_one_line(command):
    proc = subprocess.run(command, cwd=ROOT, env=NO_GPU, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    [line] = proc.stderr.splitlines()
    assert "CUDA is required" in line


def test_the_server_steps_part_times_both_loops_on_the_cpu():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    out, rows = gpu_check.server_steps(devices=("cpu",), match_epoch=2, crt_epoch=2)
    cpu = out["cpu"]
    assert cpu["match_steps"] == 2 and cpu["retrain_steps"] == 2 * 32  # 1,000 features in batches of 32
    assert cpu["match_s"] > 0 and cpu["retrain_s"] > 0
    assert [(part, setting) for part, setting, _ in rows] == [("(e) server steps", "on cpu")]
