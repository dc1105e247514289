"""Ray actors: `ClientActor` runs any logical client it is handed; `Server` holds the state, as a
Ray actor (`ServerActor`) or as an object in the driver's process (runtime.server_process).

Both open the prepared dataset once (memory-mapped, zero-copy) and build the algorithm once, so
models stay on their device between rounds; an idle actor can then serve the next run (`restart`:
sweep trials, `fedplatform.reuse_actors`). A client's randomness comes only from a generator
seeded by (seed, round, client id): the result does not depend on which actor runs it.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import time
from collections import deque

import numpy as np
import ray
import torch

from fedplatform.algorithms import ClientData
from fedplatform.config import ExperimentConfig
from fedplatform.errors import UserError
from fedplatform.runtime.replicate import PreparedData

# Chaos-testing hook: a JSON file {"round": r, "client": c, "action": "exit" | "raise" | "hang" | "alloc", ...}
# (or a list of such faults) makes the actor die (once, guarded by the file named by "marker"),
# raise, stall for "seconds", or allocate "fraction" of its GPU's memory when it runs that client.
FAULT_ENV = "FEDPLATFORM_FAULT_FILE"


class ClientOutOfMemory(RuntimeError):
    """A client needed more GPU memory than its actor's share (its `num_gpus` fraction)."""


def out_of_memory_message(client_id: int, round: int, num_gpus: float, total_bytes: int, gpu: str) -> str:
    """What a client that ran out of GPU memory is told: its cap and where the cap comes from."""
    gib = 2**30
    if 0 < num_gpus < 1:
        cap = (f"its cap is {num_gpus * total_bytes / gib:.1f} GiB, runtime.client_resources.num_gpus={num_gpus:g} "
               f"of the {total_bytes / gib:.1f} GiB of {gpu} (torch.cuda.set_per_process_memory_fraction)")
        fix = "give clients a larger runtime.client_resources.num_gpus or lower algorithm.batch_size"
    else:
        cap = f"it had the whole {total_bytes / gib:.1f} GiB of {gpu} (runtime.client_resources.num_gpus={num_gpus:g})"
        fix = "lower algorithm.batch_size or use a larger GPU"
    return f"client {client_id} ran out of GPU memory in round {round}: {cap}; {fix}"


def client_seed(seed: int, round: int, client_id: int) -> int:
    return int(np.random.SeedSequence([seed, round, client_id]).generate_state(1, np.uint64)[0] >> 1)


def pick_device(setting: str, num_gpus: float) -> torch.device:
    if setting == "cpu" or (setting == "auto" and num_gpus == 0):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(
            f"runtime.device={setting} with num_gpus={num_gpus:g} but this Ray worker sees no CUDA device; "
            "use runtime.device=cpu or start Ray on a node with GPUs"
        )
    return torch.device("cuda")


def state_bytes(tensors: dict) -> int:
    return sum(t.nbytes for t in tensors.values())


def rss_mb() -> float:
    """Resident memory of this process (current on Linux, peak elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def nonfinite(tensors: dict[str, torch.Tensor], metrics: dict | None = None) -> str | None:
    """What is inf/nan among a loss and floating tensors ("training loss is nan", ...), or None."""
    for key, value in (metrics or {}).items():
        if isinstance(value, float) and not np.isfinite(value):
            return f"its {key.replace('_', ' ')} is {value}"
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"'{key}' has inf/nan values"
    return None


def private_mb() -> float:
    """Private resident memory of this process (Linux RssAnon; else RSS): unlike RSS it leaves out
    the object store's shared pages a process maps when it reads objects."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024
    except (OSError, StopIteration):
        return rss_mb()


def to_wire(tensors: dict[str, torch.Tensor]) -> dict:
    """Tensors as numpy arrays for the object store: Ray moves those zero-copy, while pickling
    torch tensors costs ~40 ms per ResNet-8 state (measured: 43 ms vs 6 ms put+get)."""
    return {k: v.detach().cpu().numpy() if v.dtype != torch.bfloat16 else v.detach().cpu()
            for k, v in tensors.items()}


def from_wire(arrays: dict) -> dict[str, torch.Tensor]:
    # copy: object-store buffers are read-only, and algorithms may update tensors in place
    return {k: torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else v for k, v in arrays.items()}


class _Worker:
    def __init__(self, cfg: dict, data: PreparedData, num_cpus: float, num_gpus: float):
        from fedplatform.algorithms import Context, get_algorithm

        self.cfg = ExperimentConfig.model_validate(cfg)
        torch.set_num_threads(max(1, int(num_cpus)))
        self.device = pick_device(self.cfg.runtime.device, num_gpus)
        self.num_gpus = num_gpus
        if self.device.type == "cuda":
            # Same inputs, same bits: no autotuned (run-dependent) convolution algorithms.
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
            if 0 < num_gpus < 1:
                # The GPU fraction is also a memory budget: one client cannot OOM the others.
                torch.cuda.set_per_process_memory_fraction(num_gpus)
        self.fetched = data.fetch_here()  # what this actor copied to its node: at most one actor per node does
        self.ds = data.open_here()
        ctx = Context(cfg=self.cfg, num_classes=self.ds.num_classes, class_names=self.ds.class_names,
                      image_shape=self.ds.image_shape, norm_mean=self.ds.norm_mean, norm_std=self.ds.norm_std,
                      train_class_counts=self.ds.train_class_counts, device=self.device, dataset=self.ds)
        self.algo = get_algorithm(self.cfg.algorithm.name)(ctx)

    def restart(self, *args) -> dict:
        """Set up for a new run, as the constructor does (an idle actor a finished run left, taken by
        the next: `engine._IDLE`), after letting go of everything the last run held; then `ready`."""
        vars(self).clear()
        gc.collect()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()  # the new run's model may have other sizes: no fragments kept
        self.__init__(*args)
        return self.ready()

    def ready(self) -> dict:
        cap = None
        if self.device.type == "cuda":
            fraction = self.num_gpus if 0 < self.num_gpus < 1 else 1.0
            cap = int(fraction * torch.cuda.get_device_properties(self.device).total_memory)
        return {"pid": os.getpid(), "device": str(self.device), "node": ray.get_runtime_context().get_node_id(),
                "store": str(self.ds.path), "fetched": self.fetched, "gpu_memory_cap_bytes": cap}

    def _data(self, client_id: int, ids: np.ndarray) -> ClientData:
        """Pixels for fixed-size stores; for encoded stores images stay None (algorithms decode or
        use cached features by `sample_ids`)."""
        images = torch.from_numpy(self.ds.pixels(ids)) if self.ds.image_shape is not None else None
        return ClientData(client_id, images, torch.from_numpy(np.asarray(self.ds.labels[ids])), ids)


def _maybe_inject_fault(round: int, client_id: int, device: torch.device) -> None:
    path = os.environ.get(FAULT_ENV)
    if not path or not os.path.exists(path):
        return
    with open(path) as f:
        faults = json.load(f)
    for fault in faults if isinstance(faults, list) else [faults]:
        if fault.get("round") == round and fault.get("client") == client_id:
            _inject(fault, round, client_id, device)


def _inject(fault: dict, round: int, client_id: int, device: torch.device) -> None:
    if fault["action"] == "raise":
        raise RuntimeError(f"injected failure for client {client_id} in round {round}")
    if fault["action"] == "hang":
        time.sleep(fault["seconds"])
        return
    if fault["action"] == "alloc":  # a client needing `fraction` of the GPU at once
        if device.type != "cuda":
            raise RuntimeError(f"the alloc fault for client {client_id} needs a CUDA client actor, not {device}")
        block = torch.empty(int(fault["fraction"] * torch.cuda.get_device_properties(device).total_memory),
                            dtype=torch.uint8, device=device)
        del block
        torch.cuda.empty_cache()
        return
    marker = fault["marker"]
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)


@ray.remote
class ClientActor(_Worker):
    @ray.method(num_returns=2)
    def train(self, payload: dict, client_ids: list[int], round: int):
        """Runs `client_ids` one after the other: one Ray task for a few clients when the engine
        batches them (called with num_returns = 1 + their number). Returns their small statuses for
        the driver, then each one's update for the server as an object of its own (a server actor
        fetches it; the driver never does). A client that raises is named on its exception, as
        `fedplatform_client`."""
        statuses, updates = [], []
        for client_id in client_ids:
            try:
                status, update = self._train_one(payload, client_id, round)
            except Exception as exc:
                with contextlib.suppress(AttributeError):
                    exc.fedplatform_client = client_id
                raise
            statuses.append(status)
            updates.append(update)
        return (statuses, *updates)

    def _train_one(self, payload: dict, client_id: int, round: int):
        try:
            _maybe_inject_fault(round, client_id, self.device)
            start = time.perf_counter()
            data = self._data(client_id, self.ds.client_samples(client_id))
            gen = torch.Generator().manual_seed(client_seed(self.cfg.seed, round, client_id))
            update = self.algo.client_update(from_wire(payload), data, gen)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
        except torch.cuda.OutOfMemoryError as exc:
            if self.device.type != "cuda":
                raise
            raise ClientOutOfMemory(out_of_memory_message(
                client_id, round, self.num_gpus, torch.cuda.get_device_properties(self.device).total_memory,
                torch.cuda.get_device_name(self.device))) from exc
        bad = None if self.cfg.runtime.allow_nonfinite else nonfinite(update.tensors, update.metrics)
        update.tensors = to_wire(update.tensors)
        status = {"client_id": client_id, "num_samples": update.num_samples, "metrics": update.metrics,
                  "compute_s": time.perf_counter() - start, "bytes_up": state_bytes(update.tensors),
                  "rss_mb": rss_mb(), "nonfinite": bad}
        return status, update


class Server(_Worker):
    def __init__(self, cfg: dict, data: PreparedData, num_cpus: float, num_gpus: float,
                 state: dict[str, torch.Tensor] | None = None):
        super().__init__(cfg, data, num_cpus, num_gpus)
        self.state = state if state is not None else self.algo.init_server_state(self.cfg.seed)
        self._test = self._data(-1, self.ds.test_ids)
        self._client_splits = {
            cid: {split: self._data(cid, self.ds.client_samples(cid, split)) for split in self.algo.client_eval_splits}
            for cid in self.ds.client_ids if len(self.ds.client_samples(cid, "test"))
        }

    def begin_round(self, round: int, clients: list[int]) -> dict:
        """The round's payload for the clients (one object-store copy shared by all); aggregation of
        `round` then folds the clients' updates in client-id order as they arrive."""
        payload = to_wire(self.algo.broadcast(self.state))
        self._payload_bytes = state_bytes(payload)
        self._start_private = self._peak_private = private_mb()
        self._turns = deque(sorted(clients))
        self._arrived: dict[int, ray.ObjectRef | None] = {}
        self._server_s = 0.0
        self._acc = self.algo.aggregate_start(self.state, round)
        return payload

    def accumulate(self, client_id: int, update_ref: list | None) -> None:
        """`update_ref` is [ref] (in a list, so Ray leaves it unfetched) or None for a dropped
        client. Only references wait for their turn; an update is fetched when it is folded in,
        so a streaming algorithm holds one update at a time."""
        start = time.perf_counter()
        self._arrived[client_id] = update_ref[0] if update_ref else None
        while self._turns and self._turns[0] in self._arrived:
            ref = self._arrived.pop(self._turns.popleft())
            if ref is None:
                continue
            update = ray.get(ref)
            del ref
            update.tensors = from_wire(update.tensors)
            self._peak_private = max(self._peak_private, private_mb())  # the most held: sum + this update
            self.algo.aggregate_add(self._acc, update)  # the default trio keeps the list for `aggregate`
            del update
        self._server_s += time.perf_counter() - start

    def finish_round(self, round: int, evaluate: bool, check_finite: bool) -> dict:
        """New state from the folded updates, then (unless it has inf/nan) its evaluation: one call.
        Memory: resident MB and the peak private MB this round, sampled as each update is folded in,
        and that peak less the private MB at the round's start (what the round itself added: in the
        driver's process the absolute figure also counts whatever the driver holds)."""
        start = time.perf_counter()
        if self._turns:
            raise RuntimeError(f"round {round}: no update or drop was reported for clients {list(self._turns)}")
        self.state = self.algo.aggregate_finish(self.state, self._acc, round)
        self._acc = None
        peak = max(self._peak_private, private_mb())
        out = {"payload_bytes": self._payload_bytes, "peak_private_mb": peak,
               "round_growth_mb": peak - self._start_private,
               "nonfinite": nonfinite(self.state) if check_finite else None, "metrics": None}
        if evaluate and out["nonfinite"] is None:
            out["metrics"] = self.algo.evaluate(self.state, self._test) if len(self._test.labels) else {}
            if self._client_splits:
                out["metrics"].update(self.algo.evaluate_clients(self.state, self._client_splits))
        return out | {"server_s": self._server_s + time.perf_counter() - start, "rss_mb": rss_mb()}

    def get_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.state.items()}


ServerActor = ray.remote(Server)
