"""Multi-node behaviour on one machine: `ray.cluster_utils.Cluster` simulates two nodes. The
cluster needs its own Ray, so it runs in a subprocess beside the session Ray."""
from __future__ import annotations

import textwrap

import pytest

from fake_cluster import run_cluster_script

pytestmark = pytest.mark.cluster  # a two-node Ray cluster of its own, in a subprocess

SCRIPT = textwrap.dedent("""
    import hashlib, json, sys
    import ray
    from ray.cluster_utils import Cluster
    from fedplatform.config import validate
    from fedplatform.data import prepare
    from fedplatform.experiment import run_experiment
    from fedplatform.runtime.checkpoint import load
    from fedplatform.runtime.engine import Engine
    from fedplatform.runtime.replicate import PreparedData

    tmp = sys.argv[1]
    cfg = validate({
        "name": "multinode", "seed": 5,
        "data": {"dataset": "digits", "imbalance_factor": 10, "cache_dir": tmp + "/cache"},
        "partition": {"scheme": "dirichlet", "num_clients": 6, "dirichlet_alpha": 0.5},
        "model": {"name": "small_cnn"},
        "algorithm": {"name": "fedavg", "local_epochs": 1, "lr": 0.05, "augmentation": "none"},
        "rounds": 2, "clients_per_round": 3,
        "runtime": {"num_client_actors": 3, "storage": tmp + "/runs"},
        "tracking": {"experiment": "multinode"},
    })
    uri = "sqlite:///" + tmp + "/mlflow.db"

    def digest(result):
        _, state = load(result.run_dir)
        h = hashlib.sha256()
        for k in sorted(state):
            h.update(k.encode()); h.update(state[k].numpy().tobytes())
        return h.hexdigest()

    out = {}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2, resources={"worker_node": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    out["nodes"] = len([n for n in ray.nodes() if n["Alive"]])
    ds = prepare(cfg)
    engine = Engine(cfg, PreparedData.serve(ds.path), cfg.runtime.num_client_actors)
    info = ray.get([a.ready.remote() for a in engine.pool.actors])
    out["actor_nodes"] = sorted({i["node"] for i in info})
    engine.shutdown()
    multi = run_experiment(cfg, tracking_uri=uri, progress=False)
    out["multi"] = {"digest": digest(multi), "acc": [h["accuracy"] for h in multi.history]}
    ray.shutdown()
    cluster.shutdown()

    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    single = run_experiment(cfg, tracking_uri=uri, progress=False)
    out["single"] = {"digest": digest(single), "acc": [h["accuracy"] for h in single.history]}
    ray.shutdown()
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def multinode(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode")
    return run_cluster_script(SCRIPT, str(tmp), timeout=240)


def test_simulated_cluster_has_two_nodes(multinode):
    assert multinode["nodes"] == 2


def test_client_actors_spread_over_both_nodes_and_read_the_prepared_data(multinode):
    # server (1 CPU) + 3 client actors (1 CPU each) cannot fit on one 2-CPU node; each actor opens
    # the memory-mapped store at start-up, so being ready means it read the data on its node
    assert len(multinode["actor_nodes"]) == 2


def test_multi_node_result_equals_the_single_node_run(multinode):
    assert multinode["multi"] == multinode["single"]
