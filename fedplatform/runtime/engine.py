"""The round loop: seeded sampling, dispatch over a work queue of client actors, aggregation on
the server actor, evaluation, MLflow logging and checkpoints.

One round (ARCHITECTURE.md "One round, as data moves"): the server's payload goes into the object
store once; each sampled client is handed to the next idle actor; clients return a small status
(to the driver) and an update reference (to the server, never through the driver); the server
aggregates in client-id order, so neither the actor count nor finishing order changes the result.
"""
from __future__ import annotations

import heapq
import re
import statistics
import time
from collections import deque

import ray

from fedplatform.config import ExperimentConfig
from fedplatform.errors import NonFinite, RunFailed, UserError
from fedplatform.runtime.actors import ClientActor, ServerActor
from fedplatform.runtime.replicate import PreparedData
from fedplatform.runtime.resources import Cluster, bundle, check_fits_a_node, client_pool_size, release_request, \
    wait_for_resources

ACTOR_START_TIMEOUT_S = 300.0
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ClientError(RunFailed):
    """A client raised: carries the client id, the round and the client's own traceback."""


class RoundTimeout(RunFailed):
    pass


def ideal_client_time(durations: list[float], num_actors: int) -> float:
    """Makespan of the measured client durations list-scheduled, in dispatch order, on the actors."""
    finish = [0.0] * min(num_actors, max(1, len(durations)))
    for d in durations:
        heapq.heapreplace(finish, finish[0] + d)
    return max(finish)


def summarize(history: list[dict]) -> dict:
    evals = [h for h in history if "accuracy" in h]
    if not evals:
        return {"rounds": len(history)}
    best = max(evals, key=lambda h: h["accuracy"])
    last = evals[-1]
    out = {
        "rounds": history[-1]["round"],
        "final_accuracy": last["accuracy"],
        "best_accuracy": best["accuracy"],
        "best_round": best["round"],
        "mean_last10_accuracy": statistics.fmean(h["accuracy"] for h in evals[-10:]),
    }
    for key in ("many_shot_acc", "medium_shot_acc", "few_shot_acc", "in_federation_acc"):
        if key in last:
            out[f"final_{key}"] = last[key]
    validated = [h for h in evals if "val_accuracy" in h]
    if validated:  # FedCLIP's model selection: first round with the best mean validation accuracy
        chosen = max(validated, key=lambda h: h["val_accuracy"])
        out["selected_round"] = chosen["round"]
        out["selected_val_accuracy"] = chosen["val_accuracy"]
        out["selected_accuracy"] = chosen["accuracy"]
        if "in_federation_acc" in chosen:
            out["selected_in_federation_acc"] = chosen["in_federation_acc"]
    out["total_time_s"] = sum(h["time/round_s"] for h in history)
    return out


class _Pool:
    """Client actors; a dead one is replaced in place."""

    def __init__(self, n: int, args: tuple, res):
        self.args, self.res = args, res
        self.actors = [self._new() for _ in range(n)]
        try:
            self.wait_ready(self.actors)
        except BaseException:
            self.shutdown()
            raise

    def _new(self):
        return ClientActor.options(num_cpus=self.res.num_cpus, num_gpus=self.res.num_gpus).remote(*self.args)

    @staticmethod
    def wait_ready(actors) -> list[dict]:
        refs = [a.ready.remote() for a in actors]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=ACTOR_START_TIMEOUT_S)
        if pending:
            raise UserError(
                f"{len(pending)} of {len(refs)} actors could not be started within {ACTOR_START_TIMEOUT_S:.0f} s; "
                f"the Ray cluster has {ray.cluster_resources()} — lower runtime resources or add nodes"
            )
        try:
            return ray.get(ready)
        except ray.exceptions.RayActorError as exc:  # an actor's own UserError: its one line, not Ray's dump
            found = re.findall(r"UserError: (.+)", ANSI.sub("", str(exc)))
            if found:
                raise UserError(found[-1].strip()) from None
            raise

    def replace(self, i: int) -> None:
        ray.kill(self.actors[i], no_restart=True)
        self.actors[i] = self._new()
        self.wait_ready([self.actors[i]])

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)


def _server_bundle() -> dict:
    """Inside a placement group (a Tune trial) the server takes bundle 0, so bundles 1.. stay free
    for client actors whatever their shapes."""
    pg = ray.util.get_current_placement_group()
    if pg is None:
        return {}
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
        placement_group=pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)}


class Engine:
    def __init__(self, cfg: ExperimentConfig, data: PreparedData, num_actors: int, server_state=None):
        rt = cfg.runtime
        args = (cfg.model_dump(mode="json"), data)
        self.cfg = cfg
        requested = False
        if ray.util.get_current_placement_group() is not None:  # a Tune trial: its group is reserved
            n = client_pool_size(num_actors, rt.client_resources, rt.server_resources, cfg.clients_per_round)
        else:
            cluster = Cluster.observe()
            check_fits_a_node(rt.server_resources, "runtime.server_resources", cluster)
            check_fits_a_node(rt.client_resources, "runtime.client_resources", cluster)
            n = client_pool_size(num_actors, rt.client_resources, rt.server_resources, cfg.clients_per_round, cluster)
            requested = wait_for_resources([bundle(rt.server_resources)] + [bundle(rt.client_resources)] * n, cluster,
                               rt.wait_for_resources_s, f"the server and {n} client actor{'s' * (n > 1)}")
        # The server first: an actor that cannot start (a bad device, say) fails there alone, with
        # its one error, before any client actor adds the same failure to the output.
        self.server = ServerActor.options(num_cpus=rt.server_resources.num_cpus,
                                          num_gpus=rt.server_resources.num_gpus,
                                          **_server_bundle()).remote(
            *args, rt.server_resources.num_cpus, rt.server_resources.num_gpus, server_state)
        try:
            _Pool.wait_ready([self.server])
            self.pool = _Pool(n, (*args, rt.client_resources.num_cpus, rt.client_resources.num_gpus),
                              rt.client_resources)
        except BaseException:
            ray.kill(self.server, no_restart=True)
            raise
        finally:
            if requested:
                release_request()

    def run_round(self, round: int, clients: list[int], evaluate: bool) -> dict:
        cfg, start = self.cfg, time.perf_counter()
        deadline = start + cfg.runtime.round_timeout_s
        payload = self.server.broadcast.remote()  # one object-store copy shared by every client
        queue, idle = deque(clients), list(range(len(self.pool.actors)))
        running: dict = {}
        retries = {c: 0 for c in clients}
        done: dict[int, tuple[dict, ray.ObjectRef]] = {}
        durations: list[float] = []
        while queue or running:
            while queue and idle:
                i, cid = idle.pop(0), queue.popleft()
                status_ref, update_ref = self.pool.actors[i].train.remote(payload, cid, round)
                running[status_ref] = (i, cid, update_ref)
            ready, _ = ray.wait(list(running), num_returns=1, timeout=max(0.0, deadline - time.perf_counter()))
            if not ready:
                names = sorted(cid for _, cid, _ in running.values())
                raise RoundTimeout(f"round {round} exceeded runtime.round_timeout_s={cfg.runtime.round_timeout_s:g}; "
                                   f"clients still running: {names}")
            for ref in ready:
                i, cid, update_ref = running.pop(ref)
                try:
                    status = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                    retries[cid] += 1
                    if retries[cid] > cfg.runtime.max_client_retries:
                        raise ClientError(f"client {cid} in round {round}: its actor died "
                                          f"{retries[cid]} times (runtime.max_client_retries="
                                          f"{cfg.runtime.max_client_retries}): {exc}") from None
                    self.pool.replace(i)
                    queue.appendleft(cid)
                except ray.exceptions.RayTaskError as exc:
                    trace = ANSI.sub("", str(exc)).strip()
                    raise ClientError(f"client {cid} failed in round {round}. Traceback from its actor:\n"
                                      f"{trace}") from None
                else:
                    done[cid] = (status, update_ref)
                    durations.append(status["compute_s"])
                idle.append(i)
        order = sorted(done)
        self._check_finite(round, [(f"client {c}", done[c][0].get("nonfinite")) for c in order])
        server_s, server_rss = ray.get(self.server.aggregate.remote(round, [done[c][1] for c in order]))
        if not cfg.runtime.allow_nonfinite:
            self._check_finite(round, [("the aggregated server state", ray.get(self.server.nonfinite_state.remote()))])
        row: dict = {"round": round, "clients": list(clients)}
        if evaluate:
            metrics, eval_s = ray.get(self.server.evaluate.remote())
            server_s += eval_s
            row.update({k: v for k, v in metrics.items() if k != "per_class_accuracy"})
            row["per_class_accuracy"] = metrics.get("per_class_accuracy")
        statuses = [done[c][0] for c in order]
        losses = [s["metrics"]["train_loss"] for s in statuses if "train_loss" in s["metrics"]]
        if losses:
            row["train_loss"] = statistics.fmean(losses)
        wall = time.perf_counter() - start
        client_s = ideal_client_time(durations, len(self.pool.actors))
        payload_bytes = ray.get(self.server.payload_bytes.remote())
        row.update({
            "time/round_s": wall,
            "time/client_compute_s": client_s,
            "time/server_s": server_s,
            "time/orchestration_s": max(0.0, wall - client_s - server_s),
            "comm/bytes_down": payload_bytes * len(clients),
            "comm/bytes_up": sum(s["bytes_up"] for s in statuses),
            "memory/client_actor_rss_mb": max(s["rss_mb"] for s in statuses),
            "memory/server_rss_mb": server_rss,
        })
        return row

    def _check_finite(self, round: int, found: list[tuple[str, str | None]]) -> None:
        """Stop at the first inf/nan (lowest client id first) before it reaches a checkpoint."""
        for who, what in found:
            if what:
                raise NonFinite(f"{who} diverged in round {round}: {what}; the run stopped and keeps its last good "
                                "checkpoint. Lower the learning rate, or set runtime.allow_nonfinite=true to train on")

    def state(self) -> dict:
        return ray.get(self.server.get_state.remote())

    def shutdown(self) -> None:
        self.pool.shutdown()
        ray.kill(self.server, no_restart=True)
