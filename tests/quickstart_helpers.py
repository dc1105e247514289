"""Shared by the tests of quickstart runs: which client a round runs first (to inject a fault there), and a
digest of a run's final weights (to compare runs made in different places)."""
from __future__ import annotations

from pathlib import Path

QUICKSTART = Path(__file__).resolve().parents[1] / "pipelines" / "quickstart.yaml"


def first_client(round: int) -> int:
    """The first client the quickstart pipeline samples in `round` (its seed's reference sequence)."""
    from fedplatform.config import load_config
    from fedplatform.data import prepare
    from fedplatform.runtime.checkpoint import ClientSampler

    cfg = load_config(QUICKSTART)
    sampler = ClientSampler(cfg.seed, prepare(cfg).client_ids, cfg.clients_per_round)
    for _ in range(round):
        first = sampler.sample()[0]
    return int(first)


def weights_digest(run_dir: str) -> str:
    """sha256 over the run's checkpointed weights, key by key in sorted order."""
    import hashlib

    from fedplatform.runtime.checkpoint import load

    _, state = load(run_dir)
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].numpy().tobytes())
    return h.hexdigest()
