"""Multi-node behaviour on one machine: `ray.cluster_utils.Cluster` simulates two nodes. The
cluster needs its own Ray, so the multi-node run is a subprocess beside the session Ray; the
single-node reference runs in this process on the session Ray (`ray_session`)."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from fake_cluster import run_cluster_script
from quickstart_helpers import weights_digest
from fedplatform.config import validate
from fedplatform.experiment import run_experiment

pytestmark = pytest.mark.cluster  # a two-node Ray cluster of its own, in a subprocess


def config(tmp) -> dict:
    return {
        "name": "multinode", "seed": 5,
        "data": {"dataset": "digits", "imbalance_factor": 10, "cache_dir": f"{tmp}/cache"},
        "partition": {"scheme": "dirichlet", "num_clients": 6, "dirichlet_alpha": 0.5},
        "model": {"name": "small_cnn"},
        "algorithm": {"name": "fedavg", "local_epochs": 1, "lr": 0.05, "augmentation": "none"},
        "rounds": 2, "clients_per_round": 3,
        "runtime": {"num_client_actors": 3, "storage": f"{tmp}/runs"},
        "tracking": {"experiment": "multinode"},
    }


# The client actors' nodes come from Ray's actor table after the run: it keeps dead actors, with
# the node each ran on and why it died.
SCRIPT = textwrap.dedent("""
    import json, sys, time
    import ray
    from ray._private import state
    from ray.cluster_utils import Cluster
    from fedplatform.config import validate
    from fedplatform.experiment import run_experiment

    cfg, uri = validate(json.loads(sys.argv[1])), sys.argv[2]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2, resources={"worker_node": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    multi = run_experiment(cfg, tracking_uri=uri, progress=False)
    deadline = time.monotonic() + 30  # the run's ray.kill of its actors lands in the table a little later
    while True:
        clients = [a for a in state.actors().values() if a["ActorClassName"] == "ClientActor"]
        if all(a["State"] == "DEAD" for a in clients) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    clients = [{"node": a["Address"]["NodeID"], "state": a["State"], "death": str(a.get("DeathCause", ""))}
               for a in clients]
    ray.shutdown()
    cluster.shutdown()
    print("RESULT " + json.dumps({"nodes": nodes, "clients": clients, "run_dir": multi.run_dir,
                                  "acc": [h["accuracy"] for h in multi.history]}))
""")


@pytest.fixture(scope="module")
def multinode(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode")
    uri = f"sqlite:///{tmp}/mlflow.db"
    return run_cluster_script(SCRIPT, json.dumps(config(tmp)), uri, timeout=240) | {"tmp": tmp, "uri": uri}


def test_simulated_cluster_has_two_nodes(multinode):
    assert len(set(multinode["nodes"])) == 2


def test_client_actors_spread_over_both_nodes_and_read_the_prepared_data(multinode):
    # server (1 CPU) + 3 client actors (1 CPU each) cannot fit on one 2-CPU node; each actor opens
    # the memory-mapped store at start-up, and the run waits for every actor to be up, so an actor
    # the engine killed at the end (none failed: no creation error, none replaced) read the data on its node
    clients = multinode["clients"]
    assert len(clients) == 3
    assert all(c["state"] == "DEAD" and "reason: RAY_KILL" in c["death"] for c in clients), clients
    assert {c["node"] for c in clients} == set(multinode["nodes"])


def test_multi_node_result_equals_the_single_node_run(multinode, ray_session):
    # the same config on this process's single-node session Ray (4 CPUs: the server and 3 client actors)
    single = run_experiment(validate(config(multinode["tmp"])), tracking_uri=multinode["uri"], progress=False)
    assert [h["accuracy"] for h in single.history] == multinode["acc"]
    assert weights_digest(single.run_dir) == weights_digest(multinode["run_dir"])
    # auto: on one node the server runs in the driver's process, on two it is a Ray actor; same bits
    tracking = MlflowClient(multinode["uri"])
    where = {run: tracking.get_run(run).data.tags["fedplatform.server_process"]
             for run in (single.run_id, Path(multinode["run_dir"]).name)}
    assert where == {single.run_id: "driver", Path(multinode["run_dir"]).name: "actor"}
