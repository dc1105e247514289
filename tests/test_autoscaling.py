"""The cloud path on one machine: a fake autoscaling cluster whose head has no GPUs and whose GPU
worker type starts at zero nodes (as cluster.yaml). The tests share one such cluster (module
fixture) and run in file order: a request larger than any node type fails at once (nothing is
scaled); a sweep that asks for GPU fractions finds 0 GPU nodes, scales the cluster up and finishes
with the numbers of a single-node sweep; a GPU run on the scaled cluster equals a single-node run; a
request the autoscaler can never meet is one clear line after the wait. The cluster is driven by
the CLI in a subprocess (it is not the session Ray); the single-node references run in this process
on the session Ray (`ray_session`) through the Python API."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

import fedplatform
from fake_cluster import fake_cluster
from quickstart_helpers import QUICKSTART, weights_digest

pytestmark = pytest.mark.cluster

SMALL = ["rounds=2", "algorithm.local_epochs=1", "runtime.device=cpu"]
GPU_CLIENTS = ["runtime.num_client_actors=2", "runtime.client_resources.num_cpus=1",
               "runtime.client_resources.num_gpus=0.5"]


def cli(*args, env: dict, cwd: Path, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedplatform.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def run_dir_of(stdout: str) -> str:
    return re.search(r"checkpoints in (\S+)", stdout).group(1)


def gpu_nodes(cluster) -> int:
    return sum(1 for n in cluster.nodes() if n.get("GPU", 0) > 0)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One fake autoscaling cluster for the module (its start-up is most of a test's time)."""
    with fake_cluster(tmp_path_factory.mktemp("autoscaling")) as c:
        yield c


# First: it scales nothing, and it sees the head alone.
def test_a_request_larger_than_any_node_type_fails_at_once(cluster, tmp_path):
    proc = cli("run", str(QUICKSTART), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
               *sets(*SMALL, "runtime.client_resources.num_gpus=4", f"runtime.storage={tmp_path / 'runs'}"),
               env=cluster.env(), cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [(
        "error: runtime.client_resources (num_cpus=1, num_gpus=4) fits on no node type of this cluster; "
        "the Ray cluster has 2 CPUs, 0 GPUs and can grow to 6 CPUs, 2 GPUs — lower the request or add a "
        "node type that large")]
    assert "waiting for the autoscaler" not in proc.stderr


# Before any test that scales the cluster: it must start from 0 GPU nodes.
def test_a_gpu_sweep_scales_the_cluster_up_from_zero_gpus_and_matches_a_single_node_sweep(
        cluster, tmp_path, ray_session):
    def space(name: str, gpus: float) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "name": name, "base": str(QUICKSTART),
            "set": {"rounds": 2, "algorithm.local_epochs": 1, "runtime.device": "cpu",
                    "runtime.num_client_actors": 1, "runtime.server_resources.num_cpus": 0.5,
                    "runtime.client_resources": {"num_cpus": 0.5, "num_gpus": gpus},
                    "runtime.storage": str(tmp_path / "runs"), "tracking.experiment": name},
            "space": {"algorithm.lr": {"grid": [0.05, 0.1]}},
        }))
        return path

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert gpu_nodes(cluster) == 0
    proc = cli("sweep", str(space("gpu", 0.5)), "--tracking-uri", uri, env=cluster.env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert ("waiting for the autoscaler (one trial): 0/0.5 GPUs up, 0:00 elapsed of 10:00"
            in proc.stderr)
    assert gpu_nodes(cluster) >= 1
    # the same sweep without GPUs on this process's single-node session Ray
    fedplatform.sweep(space("cpu", 0.0), tracking_uri=uri)
    client = MlflowClient(uri)

    def results(experiment: str) -> dict:
        runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                                  "tags.`mlflow.parentRunId` != ''")
        return {r.data.params["algorithm.lr"]: (r.info.status, r.data.metrics["accuracy"]) for r in runs}

    gpu, cpu = results("gpu"), results("cpu")
    assert sorted(gpu) == ["0.05", "0.1"]
    assert gpu == cpu
    assert {status for status, _ in gpu.values()} == {"FINISHED"}


def test_a_gpu_run_on_the_autoscaling_cluster_matches_a_single_node_run(cluster, tmp_path, ray_session):
    """Runs on the cluster the sweep above scaled up (its GPU nodes idle for minutes before they go),
    so it need not wait; scaling from zero is the sweep's to show. Where it does wait (its own
    cluster, e.g. on another pytest-xdist worker) the wait must end in "resources ready"."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = [*SMALL, f"runtime.storage={tmp_path / 'runs'}"]
    proc = cli("run", str(QUICKSTART), "--tracking-uri", uri, *sets(*common, *GPU_CLIENTS), env=cluster.env(),
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    if "waiting for the autoscaler" in proc.stderr:
        assert "resources ready after" in proc.stderr
    assert gpu_nodes(cluster) >= 1  # the head has none: the run's half-GPU clients ran on added nodes
    # the same clients on this process's single-node session Ray, without GPUs (half a CPU each)
    single = fedplatform.run(fedplatform.load_config(QUICKSTART, [
        *common, "runtime.num_client_actors=2", "runtime.client_resources.num_cpus=0.5",
        "runtime.server_resources.num_cpus=0.5"]), tracking_uri=uri)
    assert weights_digest(run_dir_of(proc.stdout)) == weights_digest(single.run_dir)


# Last: it leaves a request behind until its wait ends, and needs nothing of the cluster's state.
def test_a_request_the_autoscaler_never_meets_fails_after_the_wait_in_one_line(cluster, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # Node types unknown to fedplatform here: only waiting tells that no node type has 4 GPUs.
    proc = cli("run", str(QUICKSTART), "--tracking-uri", uri,
               *sets(*SMALL, "runtime.num_client_actors=1", "runtime.client_resources.num_gpus=4",
                     "runtime.wait_for_resources_s=6",
                     f"runtime.storage={tmp_path / 'runs'}"),
               env=cluster.env(see_node_types=False), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "after waiting 0:06 (runtime.wait_for_resources_s)" in errors[0]
    assert "the autoscaler could not provide them" in errors[0]
    assert not (tmp_path / "runs").exists()
    client = MlflowClient(uri)
    assert not [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
                if r.info.status == "RUNNING"]
