"""Trial resources: the placement group of one trial (bundle 0 for the trial driver and the
server, one bundle per client actor) and how many trials fit side by side."""
from __future__ import annotations

import math

from fedplatform.config import ExperimentConfig
from fedplatform.errors import UserError


def _bundle(res) -> dict[str, float]:
    return {"CPU": float(res.num_cpus), "GPU": float(res.num_gpus)}


def trial_bundles(cfg: ExperimentConfig, cluster: dict) -> list[dict[str, float]]:
    """[server bundle] + [client bundle] * K; K = runtime.num_client_actors, or for 'auto'
    min(clients_per_round, client actors that fit in the cluster beside the server)."""
    rt = cfg.runtime
    server, client = _bundle(rt.server_resources), _bundle(rt.client_resources)
    if rt.num_client_actors == "auto":
        fit = [math.floor((cluster.get(r, 0.0) - server[r]) / client[r] + 1e-9) for r in ("CPU", "GPU")
               if client[r] > 0]
        k = max(1, min([cfg.clients_per_round, *fit]))
    else:
        k = rt.num_client_actors
    return [server] + [client] * k


def _need(bundles: list[dict]) -> dict[str, float]:
    return {r: sum(b.get(r, 0.0) for b in bundles) for r in ("CPU", "GPU")}


def check_trial_fits(bundles: list[dict], cluster: dict) -> None:
    need = _need(bundles)
    short = [r for r in ("CPU", "GPU") if need[r] > cluster.get(r, 0.0) + 1e-9]
    if short:
        server, client, k = bundles[0], bundles[1], len(bundles) - 1
        parts = "; ".join(
            f"{r}: {server[r]:g} (server) + {k} x {client[r]:g} (client actors) = {need[r]:g} needed, "
            f"the Ray cluster has {cluster.get(r, 0.0):g}" for r in short)
        raise UserError(f"one trial needs more than the cluster has ({parts}); lower runtime.num_client_actors "
                        "or runtime.client_resources / server_resources, or add nodes")


def concurrent_trials(bundles: list[dict], cluster: dict) -> int:
    need = _need(bundles)
    return max(1, min(math.floor(cluster.get(r, 0.0) / need[r] + 1e-9) for r in need if need[r] > 0))


def placement_group_factory(bundles: list[dict]):
    from ray.tune import PlacementGroupFactory

    # Empty head bundle: the trial driver needs no resources of its own; it runs in bundle 0
    # beside the server actor (the engine pins the server there).
    return PlacementGroupFactory([{}] + [{k: v for k, v in b.items() if v} or {"CPU": 0.01} for b in bundles],
                                 strategy="PACK")
