"""Round checkpoints: tensors in safetensors, everything else in JSON; nothing is ever unpickled.

A run directory (`<runtime.storage>/<run id>`, a local path or an object-store URI) holds
`state-rNNNNN.safetensors` (the server state) and `checkpoint.json` (round, sampler state, MLflow
run id, metric history, resolved config). The JSON is written last, atomically: it is the commit
point, so a crash mid-write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from fedplatform import storage
from fedplatform.errors import UserError

CHECKPOINT = "checkpoint.json"


class ClientSampler:
    """Seeded sampling of k of K clients per round over sorted integer ids.

    Reproduces the reference: one RandomState(seed) stream, `choice(K, k, replace=False)` per
    round (CLIP2FL spec §3.2 test vector: seed 7, K 20, k 8 -> round 1 [1, 17, 2, 5, 11, 0, 18, 6]).
    """

    def __init__(self, seed: int, client_ids: list[int], per_round: int):
        self.client_ids = sorted(client_ids)
        self.per_round = per_round
        self.rs = np.random.RandomState(seed)

    def sample(self) -> list[int]:
        picks = self.rs.choice(len(self.client_ids), self.per_round, replace=False)
        return [self.client_ids[i] for i in picks]

    def get_state(self) -> dict:
        name, keys, pos, has_gauss, gauss = self.rs.get_state()
        return {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                "cached_gaussian": float(gauss)}

    def set_state(self, s: dict) -> None:
        self.rs.set_state((s["name"], np.asarray(s["keys"], dtype=np.uint32), s["pos"], s["has_gauss"],
                           s["cached_gaussian"]))


@dataclass
class Checkpoint:
    round: int
    run_id: str
    sampler: dict
    config: dict
    fingerprint: str
    history: list[dict] = field(default_factory=list)
    state_file: str = ""
    dropped: dict[str, list[int]] = field(default_factory=dict)
    """{round: client ids dropped} (runtime.client_failures=skip): decisions already in the state."""


def save(run_dir: str, ckpt: Checkpoint, state: dict[str, torch.Tensor]) -> None:
    """Write the state file, then `checkpoint.json` (the commit point: atomic on a local disk
    through a rename, and a single PUT on an object store), then delete older state files."""
    ckpt.state_file = f"state-r{ckpt.round:05d}.safetensors"
    storage.write_bytes(storage.join(run_dir, ckpt.state_file),
                        save_tensors({k: v.contiguous() for k, v in state.items()}))
    storage.write_bytes(storage.join(run_dir, CHECKPOINT), json.dumps(asdict(ckpt)).encode())
    for old in storage.list_dir(run_dir):
        if old.startswith("state-r") and old.endswith(".safetensors") and old != ckpt.state_file:
            storage.delete(storage.join(run_dir, old))


def find_run_dir(runs_dir: str, run: str) -> str:
    """`run` is a run directory (path or URI) or a run id under `runs_dir` (runtime.storage)."""
    for candidate in (str(run), storage.join(runs_dir, run)):
        if storage.is_file(storage.join(candidate, CHECKPOINT)):
            return candidate
    raise UserError(
        f"--resume {run}: no checkpoint found at '{run}' or '{storage.join(runs_dir, run)}'; pass a run id "
        f"listed under '{runs_dir}' or a run directory path"
    )


def load(run_dir: str) -> tuple[Checkpoint, dict[str, torch.Tensor]]:
    try:
        ckpt = Checkpoint(**json.loads(storage.read_bytes(storage.join(run_dir, CHECKPOINT))))
        state = load_tensors(storage.read_bytes(storage.join(run_dir, ckpt.state_file)))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise UserError(f"checkpoint in '{run_dir}' is unreadable ({exc}); it cannot be resumed") from None
    return ckpt, state


def config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out


def jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x
