"""Trial resources: the placement group of one trial (bundle 0 for the trial driver and the
server, one bundle per client actor) and how many trials fit side by side.

On an autoscaling cluster both are sized from what the cluster can grow to (its node types), not
from the nodes up now: a sweep started on a head without GPUs plans for the GPU nodes to come.
"""
from __future__ import annotations

import math

from fedplatform.config import ExperimentConfig
from fedplatform.errors import UserError
from fedplatform.runtime.resources import KINDS, Cluster, bundle, check_fits_a_node, count, need


def _room(cluster: Cluster) -> dict[str, float]:
    return cluster.most if cluster.autoscaling else cluster.total


def trial_bundles(cfg: ExperimentConfig, cluster: Cluster) -> list[dict[str, float]]:
    """[server bundle] + [client bundle] * K; K = runtime.num_client_actors, or for 'auto'
    min(clients_per_round, client actors that fit in the cluster beside the server)."""
    rt = cfg.runtime
    server, client = bundle(rt.server_resources), bundle(rt.client_resources)
    if rt.num_client_actors == "auto":
        fit = count({k: _room(cluster).get(k, 0.0) - server[k] for k in KINDS}, client)
        k = int(max(1, min(cfg.clients_per_round, fit)))
    else:
        k = rt.num_client_actors
    return [server] + [client] * k


def check_trial_fits(cfg: ExperimentConfig, bundles: list[dict], cluster: Cluster) -> None:
    """One trial must fit in the cluster (on an autoscaling one: in what it can grow to)."""
    check_fits_a_node(cfg.runtime.server_resources, "runtime.server_resources", cluster)
    check_fits_a_node(cfg.runtime.client_resources, "runtime.client_resources", cluster)
    if cluster.autoscaling and cluster.node_types is None:
        return  # limits unknown here: the wait for the first trial's resources tells
    total, room = need(bundles), _room(cluster)
    short = [r for r in KINDS if total[r] > room.get(r, 0.0) + 1e-9]
    if short:
        server, client, k = bundles[0], bundles[1], len(bundles) - 1
        has = "can grow to" if cluster.autoscaling else "has"
        parts = "; ".join(
            f"{r}: {server[r]:g} (server) + {k} x {client[r]:g} (client actors) = {total[r]:g} needed, "
            f"the Ray cluster {has} {room.get(r, 0.0):g}" for r in short)
        raise UserError(f"one trial needs more than the cluster has ({parts}); lower runtime.num_client_actors "
                        "or runtime.client_resources / server_resources, or add nodes")


def concurrent_trials(bundles: list[dict], cluster: Cluster) -> int:
    """Trials side by side: as many as fit in the cluster (on an autoscaling one, in what it can grow to)."""
    total, room = need(bundles), _room(cluster)
    return max(1, min((math.floor(room.get(r, 0.0) / total[r] + 1e-9) for r in KINDS if total[r] > 0), default=1))


def placement_group_factory(bundles: list[dict]):
    from ray.tune import PlacementGroupFactory

    # Empty head bundle: the trial driver needs no resources of its own; it runs in bundle 0
    # beside the server actor (the engine pins the server there).
    return PlacementGroupFactory([{}] + [{k: v for k, v in b.items() if v} or {"CPU": 0.01} for b in bundles],
                                 strategy="PACK")
