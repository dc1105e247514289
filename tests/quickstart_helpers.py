"""Shared by the tests that inject a fault into a quickstart run: which client a round runs first."""
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
