"""The round loop: seeded sampling, dispatch over a work queue of client actors, aggregation on
the server (an actor, or an object in the driver's process), evaluation.

One round (ARCHITECTURE.md "One round, as data moves"): the server's payload goes into the object
store once; sampled clients are handed, in client-id order, to the actors, a few per task when
there are many per actor and their updates are small (`client_batch`), and each actor holds its
next task while enough are queued, so it never idles waiting for the driver; a task returns small
statuses (to the driver) and one update reference per client, passed to the server as soon as the
task finishes (a server actor fetches them itself, never through the driver); the server folds
updates in client-id order, so neither the actor count, the batching nor the finishing order
changes the result. With runtime.client_failures=skip a client that raises or passes
runtime.client_timeout_s is dropped (the server is told, so later clients' turns come) and the
round needs runtime.min_clients replies.
"""
from __future__ import annotations

import contextlib
import heapq
import re
import statistics
import time
from collections import deque
from typing import Callable

import ray
import torch

from fedplatform.config import ExperimentConfig
from fedplatform.errors import NonFinite, RunFailed, UserError
from fedplatform.runtime.actors import ClientActor, Server, ServerActor
from fedplatform.runtime.replicate import PreparedData
from fedplatform.runtime.resources import Cluster, bundle, check_fits_a_node, client_pool_size, release_request, \
    wait_for_resources

ACTOR_START_TIMEOUT_S = 300.0
MAX_BATCH = 4
"""Most clients one actor task runs (see `client_batch`)."""
BATCH_UPDATE_BYTES = 1 << 20
"""Clients share a task only while their updates are at most this size (see `client_batch`)."""
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ClientError(RunFailed):
    """A client raised: carries the client id, the round and the client's own traceback."""


class RoundTimeout(RunFailed):
    pass


class TooFewClients(RunFailed):
    """With runtime.client_failures=skip: a round lost so many clients that fewer than
    runtime.min_clients can reply."""


def _discard(ref) -> None:
    """Read a failed task's other return, so Ray does not log it as an unhandled error."""
    try:
        ray.get(ref, timeout=1)
    except Exception:
        pass


def client_batch(rt, clients: int, actors: int, update_bytes: int | None) -> int:
    """Clients per actor task this round. A Ray task costs about 1.5 ms of the actor's time on a
    loaded machine, so with many clients per actor a task runs a few: at most MAX_BATCH, and few
    enough that each actor still gets two tasks. One client per task when
    - each client must be told apart as it runs: client_failures=skip (a failing client is dropped,
      its batch-mates not) or a client_timeout_s (each client's clock);
    - the last round's largest update (`update_bytes`; None before the first) was over
      BATCH_UPDATE_BYTES: a batch's updates reach the server together, ahead of their turn, so the
      server would hold MAX_BATCH times more of them; and a client with a model that size trains
      far longer than a task's cost."""
    if rt.client_failures == "skip" or rt.client_timeout_s is not None:
        return 1
    if update_bytes is None or update_bytes > BATCH_UPDATE_BYTES:
        return 1
    return max(1, min(MAX_BATCH, clients // (2 * actors)))


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
        # the reference reports every domain's test accuracy at that round (held out and local)
        out.update({f"selected_{k}": v for k, v in chosen.items() if k.startswith("domain/") and k.endswith("/test_acc")})
    out["total_time_s"] = sum(h["time/round_s"] for h in history)
    return out


_IDLE: dict[tuple, object] = {}
"""Actors a run left idle, by (class, resources, bundle, placement group): the next run in this
process takes those of its shape and kills the others. A run leaves them only in a placement group
(a Tune trial: the group holds their resources either way and ends them with its trial process;
Tune's next trial in a reused trial process takes them) or inside `reuse_actors`; otherwise it
kills its actors."""
_REUSING = 0
"""How many `reuse_actors` blocks are open in this process."""


@contextlib.contextmanager
def reuse_actors():
    """Runs inside the block leave their idle actors to the next run, as sweep trials do; the actors
    keep their resources until the block ends, then are killed."""
    global _REUSING
    _REUSING += 1
    try:
        yield
    finally:
        _REUSING -= 1
        if not _REUSING and ray.is_initialized():
            _kill_idle()


def _start(cls, index: int, res, args: tuple) -> tuple:
    """An actor of `cls` for placement-group bundle `index` (when in a group) and the reference its
    readiness comes back on: an idle actor of the same shape, set up again for `args`, if this
    process's last run left one; else a new actor."""
    pg = ray.util.get_current_placement_group()
    key = (cls, res.num_cpus, res.num_gpus, index, pg and pg.id.hex())
    actor = _IDLE.pop(key, None)
    if actor is not None:
        return key, actor, actor.restart.remote(*args)
    actor = cls.options(num_cpus=res.num_cpus, num_gpus=res.num_gpus, **_in_bundle(index)).remote(*args)
    return key, actor, actor.ready.remote()


def _stop(key: tuple, actor, idle: bool) -> None:
    """Kill the actor, or leave it for the next run when it is `idle` and in a placement group or
    a `reuse_actors` block."""
    if idle and (key[-1] is not None or _REUSING):
        _IDLE[key] = actor
    else:
        ray.kill(actor, no_restart=True)


def _kill_idle() -> None:
    """What the last run left idle and this one did not take: their resources are this run's."""
    while _IDLE:
        ray.kill(_IDLE.popitem()[1], no_restart=True)


class _Pool:
    """Client actors; a dead one is replaced in place. Created without waiting (see `wait_ready`)."""

    def __init__(self, n: int, args: tuple, res):
        self.args, self.res = args, res
        self.keys, self.actors, self.starting = map(list, zip(*(self._new(i) for i in range(n))))

    def _new(self, i: int) -> tuple:
        return _start(ClientActor, i + 1, self.res, self.args)

    @staticmethod
    def wait_ready(refs: list) -> list[dict]:
        """Wait until every actor is up (`refs`: their readiness). All are read, so an error shared
        by several (a bad device) is reported once: the first actor's own one line, not Ray's dump."""
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=ACTOR_START_TIMEOUT_S)
        if pending:
            raise UserError(
                f"{len(pending)} of {len(refs)} actors could not be started within {ACTOR_START_TIMEOUT_S:.0f} s; "
                f"the Ray cluster has {ray.cluster_resources()} — lower runtime resources or add nodes"
            )
        results, errors = [], []
        for ref in refs:
            try:
                results.append(ray.get(ref))
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:  # constructor; `restart`
                errors.append(exc)
        if errors:
            found = re.findall(r"UserError: (.+)", ANSI.sub("", str(errors[0])))
            if found:
                raise UserError(found[-1].strip()) from None
            raise errors[0]
        return results

    def replace(self, i: int) -> None:
        ray.kill(self.actors[i], no_restart=True)
        self.keys[i], self.actors[i], ready = self._new(i)
        self.wait_ready([ready])

    def shutdown(self, idle: bool) -> None:
        for key, actor in zip(self.keys, self.actors):
            _stop(key, actor, idle)


def _in_bundle(index: int) -> dict:
    """Inside a placement group (a Tune trial) the server takes bundle 0 and client actor i bundle
    i + 1, so actors started together cannot take each other's places whatever their shapes."""
    pg = ray.util.get_current_placement_group()
    if pg is None:
        return {}
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
        placement_group=pg, placement_group_bundle_index=index, placement_group_capture_child_tasks=True)}


class _ActorServer:
    """The server as a Ray actor: its calls queue on it in order, so updates fold while clients train."""

    where = "actor"

    def __init__(self, args: tuple, res):
        self.key, self.actor, ready = _start(ServerActor, 0, res, args)
        self.starting, self.folds = [ready], []

    def start(self) -> None:
        pass

    def begin_round(self, round: int, clients: list[int]) -> ray.ObjectRef:
        self.folds = []
        return self.actor.begin_round.remote(round, clients)

    def accumulate(self, client_id: int, update_ref: list | None) -> None:
        self.folds.append(self.actor.accumulate.remote(client_id, update_ref))

    def finish_round(self, round: int, evaluate: bool, check_finite: bool) -> dict:
        ray.get(self.folds)  # an aggregation error surfaces here
        return ray.get(self.actor.finish_round.remote(round, evaluate, check_finite))

    def snapshot(self) -> Callable[[], dict]:
        ref = self.actor.get_state.remote()  # queued before the next round's calls
        return lambda: ray.get(ref)

    def shutdown(self, idle: bool) -> None:
        _stop(self.key, self.actor, idle)


class _DriverServer:
    """The server as an object in this process: the same calls, run in place. Built by `start`, once
    the client actors are launched, so it is made while their processes start. It sets torch's
    thread count as a server actor does (server_resources.num_cpus); `shutdown` gives this
    process (a notebook, say) its own back."""

    where, starting = "driver", ()

    def __init__(self, args: tuple, res):
        self.args, self.server, self.threads = args, None, torch.get_num_threads()

    def start(self) -> None:
        self.server = Server(*self.args)

    def begin_round(self, round: int, clients: list[int]) -> ray.ObjectRef:
        return ray.put(self.server.begin_round(round, clients))

    def accumulate(self, client_id: int, update_ref: list | None) -> None:
        self.server.accumulate(client_id, update_ref)

    def finish_round(self, round: int, evaluate: bool, check_finite: bool) -> dict:
        return self.server.finish_round(round, evaluate, check_finite)

    def snapshot(self) -> Callable[[], dict]:
        state = {k: v.clone() for k, v in self.server.get_state().items()}  # later rounds may update in place
        return lambda: state

    def shutdown(self, idle: bool) -> None:
        self.server = None
        torch.set_num_threads(self.threads)


def server_in_driver(rt, cluster: Cluster) -> bool:
    """runtime.server_process: auto hosts the server in the driver when it asks for no GPU and the
    cluster is one fixed node that the driver runs on (not a Ray Client, `ray://`, elsewhere);
    otherwise Ray places it, with its resources."""
    if rt.server_process != "auto":
        return rt.server_process == "driver"
    from ray.util.client import ray as client

    return (not rt.server_resources.num_gpus and len(cluster.nodes) == 1 and not cluster.autoscaling
            and not client.is_connected())


class Engine:
    def __init__(self, cfg: ExperimentConfig, data: PreparedData, num_actors: int, server_state=None,
                 wait: bool = True):
        """Starts the server and the client actors together; with wait=False the caller does other
        set-up while they start and calls `wait_ready` before the first round."""
        rt = cfg.runtime
        args = (cfg.model_dump(mode="json"), data)
        self.cfg, self.data = cfg, data
        self.on_drop: Callable[[int, int, str, str], None] | None = None
        """Called as (round, client id, reason, detail) when client_failures=skip drops a client."""
        requested = False
        cluster = Cluster.observe()
        if ray.util.get_current_placement_group() is not None:  # a Tune trial: its group is reserved
            n = client_pool_size(num_actors, rt.client_resources, rt.server_resources, cfg.clients_per_round)
        else:
            check_fits_a_node(rt.server_resources, "runtime.server_resources", cluster)
            check_fits_a_node(rt.client_resources, "runtime.client_resources", cluster)
            n = client_pool_size(num_actors, rt.client_resources, rt.server_resources, cfg.clients_per_round, cluster)
            requested = wait_for_resources([bundle(rt.server_resources)] + [bundle(rt.client_resources)] * n, cluster,
                               rt.wait_for_resources_s, f"the server and {n} client actor{'s' * (n > 1)}")
        where = _DriverServer if server_in_driver(rt, cluster) else _ActorServer

        def launch() -> None:
            """Server and clients start together (their start-ups overlap), on idle actors where
            the last run left some (see `_IDLE`)."""
            idle = len(_IDLE)
            self.server = where((*args, rt.server_resources.num_cpus, rt.server_resources.num_gpus, server_state),
                                rt.server_resources)
            self.pool = _Pool(n, (*args, rt.client_resources.num_cpus, rt.client_resources.num_gpus),
                              rt.client_resources)
            self._reused = len(_IDLE) < idle
            _kill_idle()

        self._launch = launch
        launch()
        self.idle = False
        """No round is running and every actor is up: the actors can serve another run (`shutdown`)."""
        self._requested = requested
        self.update_bytes: int | None = None
        """The last round's largest client update, in bytes (it decides `client_batch`)."""
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        try:
            while True:
                self.server.start()
                try:
                    _Pool.wait_ready([*self.server.starting, *self.pool.starting])
                    break
                except ray.exceptions.RayActorError:
                    if not self._reused:
                        raise
                # an idle actor the last run left has died since: this run starts on new actors
                self.pool.shutdown(idle=False)
                self.server.shutdown(idle=False)
                self._launch()
            self.idle = True
        except BaseException:
            self.shutdown()
            raise
        finally:
            if self._requested:
                release_request()
                self._requested = False

    def run_round(self, round: int, clients: list[int], evaluate: bool) -> dict:
        rt, start = self.cfg.runtime, time.perf_counter()
        self.idle = False
        deadline = start + rt.round_timeout_s
        payload = self.server.begin_round(round, clients)  # one object-store copy shared by every client
        # Dispatched in client-id order, the order the server folds updates in: few wait for their turn.
        queue = deque(sorted(clients))
        # Each actor's tasks in the order it runs them, as [status ref, clients, update refs, started at]
        # (started at: when the one ahead of it finished). While enough work remains every actor holds
        # two, so it starts its next task without waiting for the driver.
        lanes: list[deque] = [deque() for _ in self.pool.actors]
        batch = client_batch(rt, len(clients), len(lanes), self.update_bytes)
        retries = {c: 0 for c in clients}
        done: dict[int, dict] = {}
        dropped: dict[int, str] = {}
        durations: list[float] = []

        def fail(cid: int, reason: str, detail: str, error: str) -> None:
            """abort: raise `error`; skip: drop the client, and fail once too few can still reply."""
            if rt.client_failures == "abort":
                raise ClientError(error)
            dropped[cid] = reason
            self.server.accumulate(cid, None)
            if self.on_drop is not None:
                self.on_drop(round, cid, reason, detail)
            need = rt.min_clients or 1
            if len(clients) - len(dropped) < need:
                causes = ", ".join(f"client {c} {why}" for c, why in sorted(dropped.items()))
                raise TooFewClients(f"round {round}: {len(dropped)} of {len(clients)} clients dropped ({causes}), "
                                    f"so at most {len(clients) - len(dropped)} can reply, fewer than "
                                    f"runtime.min_clients={need}")

        def replace(i: int) -> None:
            """A new actor for lane i; the clients queued behind the lost one go back to the queue."""
            queue.extendleft(sorted((cid for _, cids, _, _ in lanes[i] for cid in cids), reverse=True))
            lanes[i].clear()
            self.pool.replace(i)

        while queue or any(lanes):
            for depth in (1, 2):  # first every idle actor, then a second client each, in client-id order
                for i, lane in enumerate(lanes):
                    if queue and len(lane) < depth and (depth == 1 or len(queue) >= len(lanes)):
                        cids = [queue.popleft() for _ in range(min(batch, len(queue)))]
                        status_ref, *update_refs = self.pool.actors[i].train.options(
                            num_returns=1 + len(cids)).remote(payload, cids, round)
                        lane.append([status_ref, cids, update_refs, time.perf_counter()])
            heads = {lane[0][0]: i for i, lane in enumerate(lanes) if lane}
            wake = deadline
            if rt.client_timeout_s is not None:
                wake = min(wake, min(lane[0][3] for lane in lanes if lane) + rt.client_timeout_s)
            ready, _ = ray.wait(list(heads), num_returns=1, timeout=max(0.0, wake - time.perf_counter()))
            if not ready and time.perf_counter() >= deadline:
                names = sorted(cid for lane in lanes if lane for cid in lane[0][1])  # not those queued behind them
                raise RoundTimeout(f"round {round} exceeded runtime.round_timeout_s={rt.round_timeout_s:g}; "
                                   f"clients still running: {names}")
            for ref in ready:
                i = heads[ref]
                _, cids, update_refs, _ = lanes[i].popleft()
                if lanes[i]:
                    lanes[i][0][3] = time.perf_counter()
                try:
                    statuses = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                    # Each client of the task is charged, and from now on each runs alone, so a
                    # death that comes again names the client that causes it.
                    batch = 1
                    for cid in cids:
                        retries[cid] += 1
                    over = [cid for cid in cids if retries[cid] > rt.max_client_retries]
                    if over:
                        who = (f"client {cids[0]} in round {round}: its actor" if len(cids) == 1 else
                               f"clients {cids} in round {round}, run in one task: their actor")
                        fail(over[0], "actor died", str(exc), f"{who} died {retries[over[0]]} times "
                             f"(runtime.max_client_retries={rt.max_client_retries}): {exc}")
                    queue.extendleft(reversed([cid for cid in cids if cid not in over]))
                    replace(i)
                except ray.exceptions.RayTaskError as exc:
                    cid = getattr(getattr(exc, "cause", None), "fedplatform_client", cids[0])
                    trace = ANSI.sub("", str(exc)).strip()
                    for update_ref in update_refs:
                        _discard(update_ref)
                    fail(cid, "raised", f"Traceback from its actor:\n{trace}",
                         f"client {cid} failed in round {round}. Traceback from its actor:\n{trace}")
                else:
                    for cid, status, update_ref in zip(cids, statuses, update_refs):
                        # checked before it is folded in
                        self._check_finite(round, [(f"client {cid}", status.get("nonfinite"))])
                        done[cid] = status
                        self.server.accumulate(cid, [update_ref])  # streamed to the server now
                        durations.append(status["compute_s"])
            if rt.client_timeout_s is not None:
                now = time.perf_counter()
                for i, lane in enumerate(lanes):
                    if lane and now - lane[0][3] >= rt.client_timeout_s:
                        cid = lane.popleft()[1][0]  # with a client_timeout_s every task runs one client
                        fail(cid, "timed out", f"still running after runtime.client_timeout_s="
                             f"{rt.client_timeout_s:g} s; its actor was replaced",
                             f"client {cid} in round {round} exceeded runtime.client_timeout_s="
                             f"{rt.client_timeout_s:g}")
                        replace(i)  # kills the hung task: nothing keeps working in the background
        server = self.server.finish_round(round, evaluate, not rt.allow_nonfinite)
        self._check_finite(round, [("the aggregated server state", server["nonfinite"])])
        row: dict = {"round": round, "clients": list(clients), "dropped_clients": sorted(dropped),
                     "clients/succeeded": len(done), "clients/dropped": len(dropped)}
        if evaluate:
            row.update({k: v for k, v in server["metrics"].items() if k != "per_class_accuracy"})
            row["per_class_accuracy"] = server["metrics"].get("per_class_accuracy")
        statuses = [done[c] for c in sorted(done)]
        self.update_bytes = max((s["bytes_up"] for s in statuses), default=None)
        losses = [s["metrics"]["train_loss"] for s in statuses if "train_loss" in s["metrics"]]
        if losses:
            row["train_loss"] = statistics.fmean(losses)
        wall = time.perf_counter() - start
        client_s = ideal_client_time(durations, len(self.pool.actors))
        row.update({
            "time/round_s": wall,
            "time/client_compute_s": client_s,
            "time/server_s": server["server_s"],
            "time/orchestration_s": max(0.0, wall - client_s - server["server_s"]),
            "comm/bytes_down": server["payload_bytes"] * len(clients),
            "comm/bytes_up": sum(s["bytes_up"] for s in statuses),
            "memory/client_actor_rss_mb": max(s["rss_mb"] for s in statuses),
            "memory/server_rss_mb": server["rss_mb"],
            "memory/server_peak_private_mb": server["peak_private_mb"],
            "memory/server_round_growth_mb": server["round_growth_mb"],
        })
        self.idle = True
        return row

    def _check_finite(self, round: int, found: list[tuple[str, str | None]]) -> None:
        """Stop at the first inf/nan reported, before it is aggregated or reaches a checkpoint."""
        for who, what in found:
            if what:
                raise NonFinite(f"{who} diverged in round {round}: {what}; the run stopped and keeps its last good "
                                "checkpoint. Lower the learning rate, or set runtime.allow_nonfinite=true to train on")

    def state(self) -> dict:
        return self.snapshot()()

    def snapshot(self) -> Callable[[], dict]:
        """The server's state as it is now, to fetch later (later rounds do not change it)."""
        return self.server.snapshot()

    def shutdown(self) -> None:
        """Kill the actors, or leave them idle for the next run (see `_IDLE`)."""
        self.data.stop_file_server()
        self.pool.shutdown(self.idle)
        self.server.shutdown(self.idle)
