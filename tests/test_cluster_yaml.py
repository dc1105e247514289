"""cluster.yaml is a valid Ray cluster-launcher file pinned to the versions the project runs."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import mlflow
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load(CLUSTER.read_text())


def setup_text(cluster) -> str:
    return "\n".join(cluster["setup_commands"])


def test_cluster_yaml_validates_against_rays_schema(cluster):
    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_unknown_keys_are_rejected_by_the_same_check(cluster):
    bad = copy.deepcopy(cluster)
    bad["not_a_key"] = 1
    with pytest.raises(Exception):
        validate_config(prepare_config(bad))


def test_pinned_ray_version_equals_the_installed_one(cluster):
    pins = re.findall(r'"ray\[[^\]]*\]==([0-9][^"\s]*)"', setup_text(cluster))
    assert pins == [ray.__version__]


def test_pinned_mlflow_version_equals_the_installed_one(cluster):
    assert re.findall(r'"mlflow==([0-9][^"\s]*)"', setup_text(cluster)) == [mlflow.__version__]


def test_fedplatform_is_installed_from_the_mounted_checkout(cluster):
    assert cluster["file_mounts"]["~/fedplatform"] == "."
    assert 'pip install -q -e "$HOME/fedplatform[aws]"' in setup_text(cluster)  # boto3 for the S3 bucket


def test_gpu_worker_types_scale_from_zero_with_one_and_four_gpus(cluster):
    workers = {k: v for k, v in cluster["available_node_types"].items() if k != cluster["head_node_type"]}
    assert sorted(v["resources"].get("GPU") for v in workers.values()) == [1, 4]
    assert all(v["min_workers"] == 0 for v in workers.values())
    assert "GPU" not in cluster["available_node_types"][cluster["head_node_type"]]["resources"]


def test_mlflow_server_binds_to_the_private_address_and_workers_point_at_it(cluster):
    head = "\n".join(cluster["head_setup_commands"])
    assert "mlflow server" in head and "--host $(hostname -I" in head and "0.0.0.0" not in head
    assert "sqlite:////data/" in head and "s3://CHANGE-ME" in head
    workers = "\n".join(cluster["worker_setup_commands"] + cluster["worker_start_ray_commands"])
    assert "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in workers
    assert "FEDPLATFORM_CACHE=/data/" in workers
    assert "--dashboard-host=127.0.0.1" in "\n".join(cluster["head_start_ray_commands"])


def test_the_head_keeps_runs_and_sweeps_on_the_bucket(cluster):
    # ray start's environment reaches `ray job submit` drivers; ~/.bashrc reaches `ray attach` shells
    for commands in ("head_start_ray_commands", "head_setup_commands"):
        assert "FEDPLATFORM_STORAGE=s3://CHANGE-ME-fedplatform-mlflow-artifacts/runs" in "\n".join(cluster[commands])
