"""Resource arithmetic on fixed and autoscaling clusters, without starting one (the fake
autoscaling cluster runs in tests/test_autoscaling.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedplatform.config import Resources, validate
from fedplatform.errors import UserError
from fedplatform.runtime.resources import Cluster, NodeTypes, check_fits_a_node, client_pool_size, \
    wait_for_resources
from fedplatform.tune.resources import check_trial_fits, concurrent_trials, trial_bundles

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"
HEAD_ONLY = {"CPU": 8.0, "GPU": 0.0}


def autoscaling(types: NodeTypes | None = None) -> Cluster:
    """cluster.yaml right after `ray up`: the head is up, no GPU worker yet."""
    types = types or NodeTypes.from_launcher(yaml.safe_load(CLUSTER_YAML.read_text()))
    return Cluster(dict(HEAD_ONLY), dict(HEAD_ONLY), (dict(HEAD_ONLY),), autoscaling=True, node_types=types)


def fixed(cpus: float, gpus: float = 0.0) -> Cluster:
    res = {"CPU": cpus, "GPU": gpus}
    return Cluster(dict(res), dict(res), (dict(res),), autoscaling=False)


def gpu_cfg(**runtime):
    return validate({"clients_per_round": 8, "runtime": {"client_resources": {"num_cpus": 1, "num_gpus": 0.25},
                                                         **runtime}})


def test_cluster_yaml_node_types_bound_what_the_cluster_can_grow_to():
    types = NodeTypes.from_launcher(yaml.safe_load(CLUSTER_YAML.read_text()))
    # max_workers: 4 in all: at most two 4-GPU nodes and two 1-GPU nodes beside the 8-CPU head
    assert types.limits == {"CPU": 8 + 48 + 48 + 4 + 4, "GPU": 4 + 4 + 1 + 1}
    assert {"CPU": 48, "GPU": 4} in types.shapes


def test_auto_pool_on_an_autoscaling_cluster_is_sized_from_its_node_types_not_from_the_head():
    cfg = gpu_cfg()
    rt = cfg.runtime
    assert client_pool_size("auto", rt.client_resources, rt.server_resources, 8, autoscaling()) == 8
    assert client_pool_size("auto", rt.client_resources, rt.server_resources, 3, autoscaling()) == 3


def test_auto_pool_on_a_fixed_cluster_without_gpus_is_a_clear_error():
    rt = gpu_cfg().runtime
    with pytest.raises(UserError, match=r"runtime.client_resources \(num_cpus=1, num_gpus=0.25\) cannot be placed "
                                        r"beside the server \(num_cpus=1, num_gpus=0\): the Ray cluster has 8 CPUs, "
                                        r"0 GPUs; lower the per-client request"):
        client_pool_size("auto", rt.client_resources, rt.server_resources, 8, fixed(8))


def test_a_bundle_no_node_type_can_hold_fails_at_once():
    with pytest.raises(UserError, match=r"runtime.client_resources \(num_cpus=1, num_gpus=8\) fits on no node type "
                                        r"of this cluster; the Ray cluster has 8 CPUs, 0 GPUs and can grow to 112 "
                                        r"CPUs, 10 GPUs"):
        check_fits_a_node(Resources(num_cpus=1, num_gpus=8), "runtime.client_resources", autoscaling())


def test_a_sweep_on_an_autoscaling_cluster_plans_trials_for_the_gpus_to_come():
    cfg = gpu_cfg(num_client_actors=4)
    cluster = autoscaling()
    bundles = trial_bundles(cfg, cluster)
    check_trial_fits(cfg, bundles, cluster)  # 1 GPU per trial; the cluster can grow to 10
    assert concurrent_trials(bundles, cluster) == 10
    assert concurrent_trials(bundles, fixed(8, 1)) == 1


def test_a_trial_larger_than_the_cluster_can_grow_names_the_arithmetic():
    cfg = gpu_cfg(num_client_actors=48)
    with pytest.raises(UserError, match=r"GPU: 0 \(server\) \+ 48 x 0.25 \(client actors\) = 12 needed, the Ray "
                                        r"cluster can grow to 10"):
        check_trial_fits(cfg, trial_bundles(cfg, autoscaling()), autoscaling())


def test_a_fixed_cluster_never_waits():
    with pytest.raises(UserError, match=r"the server and 2 client actors needs 3 CPUs, 1 GPUs; the Ray cluster has "
                                        r"2 CPUs, 0 GPUs — lower the request or add nodes"):
        wait_for_resources([{"CPU": 1.0, "GPU": 0.0}] + [{"CPU": 1.0, "GPU": 0.5}] * 2, fixed(2), 600,
                           "the server and 2 client actors")


def test_wait_zero_on_an_autoscaling_cluster_fails_at_once_and_says_why():
    with pytest.raises(UserError, match=r"runtime.wait_for_resources_s=0 does not wait for the autoscaler"):
        wait_for_resources([{"CPU": 1.0, "GPU": 1.0}], autoscaling(), 0, "one trial")


def test_what_is_there_needs_no_wait():
    assert wait_for_resources([{"CPU": 1.0, "GPU": 0.0}], autoscaling(), 600, "one trial") is False
