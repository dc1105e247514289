"""Resource arithmetic: how many client actors fit, checked before anything is scheduled.

Inside a placement group (a Tune trial) the pool is sized from the group's bundles, never from
the whole cluster (the Flower-in-Tune hang); bundle 0 belongs to the trial driver and server.
"""
from __future__ import annotations

import math

import ray

from fedplatform.config import Resources
from fedplatform.errors import UserError


def _fits(bundle: dict, res: Resources) -> bool:
    return bundle.get("CPU", 0) >= res.num_cpus and bundle.get("GPU", 0) >= res.num_gpus


def _count(avail: dict, res: Resources) -> float:
    limits = [math.inf]
    if res.num_cpus > 0:
        limits.append(math.floor(avail.get("CPU", 0) / res.num_cpus + 1e-9))
    if res.num_gpus > 0:
        limits.append(math.floor(avail.get("GPU", 0) / res.num_gpus + 1e-9))
    return min(limits)


def _describe(res: Resources) -> str:
    return f"num_cpus={res.num_cpus:g}, num_gpus={res.num_gpus:g}"


def check_server_fits(server: Resources) -> None:
    total = ray.cluster_resources()
    if _count(total, server) < 1:
        raise UserError(
            f"runtime.server_resources ({_describe(server)}) cannot be placed: the Ray cluster has "
            f"{total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs"
        )


def client_pool_size(requested: int | str, client: Resources, clients_per_round: int,
                     server_placed: bool = True) -> int:
    """Number of client actors: `requested`, or for 'auto' as many as fit (capped by clients_per_round)."""
    pg = ray.util.get_current_placement_group()
    if pg is not None:
        bundles = pg.bundle_specs[1:]
        fit = sum(_fits(b, client) for b in bundles)
        where = f"the trial's placement group ({len(bundles)} client bundles of {bundles[0] if bundles else {}})"
    else:
        total = ray.cluster_resources()
        avail = ray.available_resources() if server_placed else total
        fit = _count(avail, client)
        where = (f"the Ray cluster ({total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs in total; "
                 f"{avail.get('CPU', 0):g} CPUs, {avail.get('GPU', 0):g} GPUs free)")
        if _count(total, client) < 1:
            fit = 0
    if requested == "auto":
        n = int(min(fit, clients_per_round))
    else:
        n = int(requested)
        if n > fit:
            raise UserError(
                f"runtime.num_client_actors={n} with client_resources ({_describe(client)}) does not fit in "
                f"{where}: at most {int(fit) if fit != math.inf else n} fit"
            )
    if n < 1:
        raise UserError(
            f"runtime.client_resources ({_describe(client)}) cannot be placed in {where}; "
            "lower the per-client request or add resources"
        )
    return n
