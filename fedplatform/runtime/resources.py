"""Resources: how many client actors fit, and waiting for an autoscaler to provide them.

A fixed cluster is checked against what it has now: a request that does not fit is one clear error
before anything is scheduled. An autoscaling cluster (a Ray cluster launcher's `ray up`, with GPU
worker types at `min_workers: 0`) may have no GPUs when a run starts: the request is sized from what
the cluster can grow to (its node types, when known), handed to the autoscaler
(`ray.autoscaler.sdk.request_resources`) and waited for, with a progress line, up to
`runtime.wait_for_resources_s`. Inside a placement group (a Tune trial) the pool is sized from the
group's bundles, never from the whole cluster (the Flower-in-Tune hang); bundle 0 belongs to the
trial driver and the server.

Node types come from the autoscaler's published cluster config (autoscaler v2, KubeRay) or from the
launcher's config file on the head (`$FEDPLATFORM_CLUSTER_CONFIG`, default
`~/ray_bootstrap_config.yaml`, which `ray up` writes there).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import ray

from fedplatform.config import Resources
from fedplatform.errors import UserError

log = logging.getLogger(__name__)

KINDS = ("CPU", "GPU")
CLUSTER_CONFIG_ENV = "FEDPLATFORM_CLUSTER_CONFIG"
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
AUTOSCALER_STATUS_KEY = "__autoscaling_status"  # written by the head's monitor (autoscaler v1)
READONLY_NODE_TYPE = re.compile(r"node_[0-9a-f]{56}")
PROGRESS_EVERY_S = 10.0


def bundle(res: Resources) -> dict[str, float]:
    return {"CPU": float(res.num_cpus), "GPU": float(res.num_gpus)}


def describe(res: Resources) -> str:
    return f"num_cpus={res.num_cpus:g}, num_gpus={res.num_gpus:g}"


def count(avail: dict, b: dict) -> float:
    """How many copies of bundle `b` fit in the resources `avail` (inf when `b` asks for nothing)."""
    limits = [math.floor(avail.get(k, 0.0) / b[k] + 1e-9) for k in KINDS if b.get(k, 0) > 0]
    return min(limits, default=math.inf)


def need(bundles: list[dict]) -> dict[str, float]:
    return {k: sum(b.get(k, 0.0) for b in bundles) for k in KINDS}


def _holds(node: dict, b: dict) -> bool:
    return all(node.get(k, 0.0) + 1e-9 >= b.get(k, 0.0) for k in KINDS)


def _show(res: dict) -> str:
    return f"{res.get('CPU', 0.0):g} CPUs, {res.get('GPU', 0.0):g} GPUs"


@dataclass(frozen=True)
class NodeTypes:
    """What an autoscaling cluster's launcher config allows: each node type's resources, and the
    most of each resource the whole cluster can reach (per-type and cluster-wide max_workers)."""

    shapes: tuple[dict, ...]
    limits: dict[str, float]

    @classmethod
    def from_launcher(cls, config: dict) -> NodeTypes:
        types, head = config["available_node_types"], config["head_node_type"]
        cap = int(config.get("max_workers", 10**6))
        head_res = dict(types[head].get("resources") or {})
        workers = [dict(t.get("resources") or {}) for name, t in types.items() if name != head
                   for _ in range(min(int(t.get("max_workers", 0)), cap))]
        limits = {k: head_res.get(k, 0.0) + sum(sorted((w.get(k, 0.0) for w in workers), reverse=True)[:cap])
                  for k in KINDS}
        shapes = [head_res] + [dict(t.get("resources") or {}) for name, t in types.items()
                               if name != head and int(t.get("max_workers", 0)) > 0]
        return cls(tuple(shapes), limits)


@dataclass(frozen=True)
class Cluster:
    """What the cluster has now, and what it can grow to."""

    total: dict
    available: dict
    nodes: tuple[dict, ...]
    """Resources of each node alive now."""
    autoscaling: bool
    node_types: NodeTypes | None = None
    """Known for an autoscaling cluster whose launcher config is published or readable here."""

    @classmethod
    def observe(cls) -> Cluster:
        nodes = tuple(n["Resources"] for n in ray.nodes() if n.get("Alive"))
        types = _node_types()
        return cls(ray.cluster_resources(), ray.available_resources(), nodes,
                   autoscaling=types is not None or _autoscaler_running(), node_types=types)

    @property
    def most(self) -> dict[str, float]:
        """The most each resource can reach: the node types' limits when known, else what is there now."""
        if self.node_types is None:
            return dict(self.total)
        return {k: max(self.node_types.limits.get(k, 0.0), self.total.get(k, 0.0)) for k in KINDS}

    def can_ever_hold(self, b: dict) -> bool:
        """Some node (now, or of a known node type) can hold bundle `b` on its own."""
        if any(_holds(n, b) for n in self.nodes):
            return True
        if self.node_types is not None:
            return any(_holds(r, b) for r in self.node_types.shapes)
        return self.autoscaling  # node types unknown: only the autoscaler can tell

    def describe(self) -> str:
        text = f"the Ray cluster has {_show(self.total)}"
        if self.autoscaling:
            text += (f" and can grow to {_show(self.most)}" if self.node_types is not None
                     else " (autoscaling; its node types are unknown here)")
        return text


def _node_types() -> NodeTypes | None:
    """The node types from the autoscaler's published cluster config, or the launcher file on this node."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
        if config is not None and config.node_group_configs:
            return NodeTypes(tuple(dict(g.resources) for g in config.node_group_configs if g.max_count != 0),
                             state.get_max_resources_from_cluster_config() or {})
    except Exception:  # noqa: BLE001 - a Ray without it, or nothing published: fall back to the file
        pass
    path = Path(os.environ.get(CLUSTER_CONFIG_ENV) or BOOTSTRAP_CONFIG).expanduser()
    if not path.is_file():
        return None
    import yaml

    try:
        return NodeTypes.from_launcher(yaml.safe_load(path.read_text()))
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"cluster config '{path}' ({CLUSTER_CONFIG_ENV}) cannot be read as a Ray cluster launcher "
                        f"file ({type(exc).__name__}); point {CLUSTER_CONFIG_ENV} at the cluster's YAML") from None


def _autoscaler_running() -> bool:
    """An autoscaler with a launcher config runs: its report names node types of that config.
    Every Ray head runs a monitor; without a config its read-only provider names each node
    `node_<node id>`, and nothing can be added."""
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        report = json.loads(_internal_kv_get(AUTOSCALER_STATUS_KEY) or "{}").get("autoscaler_report") or {}
    except Exception:  # noqa: BLE001 - no GCS access or an unknown format: behave as a fixed cluster
        return False
    types = set((report.get("node_type_mapping") or {}).values()) | set(report.get("active_nodes") or {})
    return any(not READONLY_NODE_TYPE.fullmatch(t) for t in types)


def check_fits_a_node(res: Resources, name: str, cluster: Cluster) -> None:
    """One actor's request must fit on one node (now, or of some node type), or it can never start."""
    if not cluster.can_ever_hold(bundle(res)):
        where = "no node type of this cluster" if cluster.node_types is not None else "no node of this cluster"
        raise UserError(f"{name} ({describe(res)}) fits on {where}; {cluster.describe()} — lower the request "
                        "or add a node type that large")


def client_pool_size(requested: int | str, client: Resources, server: Resources, clients_per_round: int,
                     cluster: Cluster | None = None) -> int:
    """Number of client actors: `requested`, or for 'auto' as many as fit beside the server, capped
    by clients_per_round. In a placement group: from its bundles; elsewhere from what the cluster
    has (a fixed one; actors busy elsewhere are waited for) or can grow to (an autoscaling one)."""
    pg = ray.util.get_current_placement_group()
    c, s = bundle(client), bundle(server)
    if pg is not None:
        bundles = pg.bundle_specs[1:]
        fit = sum(_holds(b, c) for b in bundles)
        where = f"the trial's placement group has {len(bundles)} client bundles of {bundles[0] if bundles else {}}"
    else:
        cluster = cluster or Cluster.observe()
        if cluster.autoscaling and cluster.node_types is None and requested != "auto":
            return int(requested)  # what it can grow to is unknown here: the wait for resources tells
        fit = count({k: cluster.most.get(k, 0.0) - s[k] for k in KINDS}, c) if cluster.can_ever_hold(c) else 0
        where = cluster.describe()
        if cluster.autoscaling and cluster.node_types is None and fit < 1:
            raise UserError(f"runtime.num_client_actors=auto cannot be sized: {where}, and no client actor "
                            f"({describe(client)}) fits beside the server in what is up now; set "
                            f"runtime.num_client_actors to a number, or point ${CLUSTER_CONFIG_ENV} at the "
                            "cluster's launcher YAML")
    if requested == "auto":
        n = int(min(fit, clients_per_round))
    else:
        n = int(requested)
        if n > fit:
            raise UserError(
                f"runtime.num_client_actors={n} with client_resources ({describe(client)}) does not fit beside "
                f"the server ({describe(server)}): {where}, so at most {int(fit) if fit != math.inf else n} fit"
            )
    if n < 1:
        raise UserError(
            f"runtime.client_resources ({describe(client)}) cannot be placed beside the server "
            f"({describe(server)}): {where}; lower the per-client request or add resources"
        )
    return n


def wait_for_resources(bundles: list[dict], cluster: Cluster, wait_s: float, what: str) -> bool:
    """Return once the cluster has the resources of `bundles`. A fixed cluster either has them or it
    is an error; an autoscaling cluster is asked for them and waited for up to `wait_s`, with a
    progress line every few seconds; one clear error when they never come. True if the autoscaler
    was asked (`release_request` once the actors are placed)."""
    wanted = need(bundles)

    def missing(have: dict) -> bool:
        return any(wanted[k] > have.get(k, 0.0) + 1e-9 for k in KINDS)

    if not missing(cluster.available) or (not cluster.autoscaling and not missing(cluster.total)):
        return False  # all there (some perhaps busy with other work: Ray queues the actors until free)
    if not cluster.autoscaling or (cluster.node_types is not None and missing(cluster.most)):
        raise UserError(f"{what} needs {_show(wanted)}; {cluster.describe()} — lower the request or add nodes")
    if wait_s <= 0:
        raise UserError(f"{what} needs {_show(wanted)}; {cluster.describe()}, and runtime.wait_for_resources_s=0 "
                        "does not wait for the autoscaler")
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[{k: v for k, v in b.items() if v > 0} or {"CPU": 0.01} for b in bundles])
    start = time.monotonic()
    last = start - PROGRESS_EVERY_S  # a first line at once
    while missing(total := ray.cluster_resources()):
        elapsed = time.monotonic() - start
        if elapsed >= wait_s:
            request_resources(num_cpus=0)  # withdraw the request: nothing will use it
            raise UserError(f"{what} needs {_show(wanted)}; after waiting {_clock(wait_s)} "
                            f"(runtime.wait_for_resources_s) the cluster has {_show(total)}: the autoscaler could "
                            "not provide them (check the node types' max_workers, the cloud quota, `ray status`)")
        if time.monotonic() - last >= PROGRESS_EVERY_S:
            last = time.monotonic()
            up = ", ".join(f"{total.get(k, 0.0):g}/{wanted[k]:g} {k}s" for k in KINDS
                           if wanted[k] > total.get(k, 0.0) + 1e-9)
            log.info("waiting for the autoscaler (%s): %s up, %s elapsed of %s", what, up, _clock(elapsed),
                     _clock(wait_s))
        time.sleep(0.5)
    log.info("resources ready after %s: the cluster has %s", _clock(time.monotonic() - start), _show(total))
    return True


def release_request() -> None:
    """The actors are placed (they hold their nodes now): drop the request so idle nodes can go."""
    from ray.autoscaler.sdk import request_resources

    request_resources(num_cpus=0)


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 60}:{s % 60:02d}"

