"""On a CUDA GPU (marker `gpu`; skipped without one): fractional client actors, each capped to its
memory share, and bit-identical weights whatever the number of GPU client actors. Digits and the
small CNN, so `pytest -m gpu` takes a minute or two. benchmarks/gpu_check.sh runs these first."""
from __future__ import annotations

import json

import pytest
import ray
import torch

from fedplatform.data import prepare
from fedplatform.experiment import run_experiment
from fedplatform.runtime.engine import Engine
from fedplatform.runtime.replicate import PreparedData
from test_runtime import assert_same_state, final_state, make_cfg

NO_CUDA = "needs a CUDA GPU (torch.cuda.is_available() is false)"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA),
              pytest.mark.usefixtures("ray_session")]


def gpu_cfg(tmp, num_gpus: float, actors: int, **over):
    return make_cfg(tmp, **{"runtime.device": "cuda", "runtime.num_client_actors": actors,
                            "runtime.client_resources": {"num_cpus": 1, "num_gpus": num_gpus},
                            "runtime.server_resources": {"num_cpus": 0}, **over})


def test_quarter_gpu_clients_are_each_capped_and_one_past_its_share_fails_alone(tmp_path, ray_session):
    cfg = gpu_cfg(tmp_path, 0.25, 4, **{"runtime.client_failures": "skip"})
    total = torch.cuda.get_device_properties(0).total_memory
    clients = [0, 2, 4, 6, 8]
    under, over = clients[1], clients[3]
    # `under` takes 0.2 of the GPU at once (within its share), `over` 0.3 (past it)
    ray_session["fault_file"].write_text(json.dumps([
        {"round": 1, "client": under, "action": "alloc", "fraction": 0.2},
        {"round": 1, "client": over, "action": "alloc", "fraction": 0.3}]))
    drops = []
    engine = Engine(cfg, PreparedData.serve(prepare(cfg).path), cfg.runtime.num_client_actors)
    try:
        info = ray.get([a.ready.remote() for a in engine.pool.actors])
        engine.on_drop = lambda *drop: drops.append(drop)
        first = engine.run_round(1, clients, evaluate=True)
        ray_session["fault_file"].unlink()
        second = engine.run_round(2, clients, evaluate=True)  # the failed client's actor is still fine
    finally:
        ray_session["fault_file"].unlink(missing_ok=True)
        engine.shutdown()
    assert [i["device"] for i in info] == ["cuda"] * 4
    assert [i["gpu_memory_cap_bytes"] for i in info] == [int(0.25 * total)] * 4
    assert first["dropped_clients"] == [over] and first["clients/succeeded"] == 4
    assert 0.0 <= first["accuracy"] <= 1.0
    [(round, client, reason, detail)] = drops
    assert (round, client, reason) == (1, over, "raised")
    assert (f"ClientOutOfMemory: client {over} ran out of GPU memory in round 1: its cap is "
            f"{0.25 * total / 2**30:.1f} GiB, runtime.client_resources.num_gpus=0.25 of the "
            f"{total / 2**30:.1f} GiB of {torch.cuda.get_device_name(0)}") in detail
    assert second["dropped_clients"] == [] and second["clients/succeeded"] == 5


def test_one_and_two_gpu_client_actors_give_bit_identical_weights(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    one = run_experiment(gpu_cfg(tmp_path, 0.5, 1), tracking_uri=uri, progress=False)
    two = run_experiment(gpu_cfg(tmp_path, 0.5, 2), tracking_uri=uri, progress=False)
    assert_same_state(final_state(one), final_state(two))
    assert [h["accuracy"] for h in one.history] == [h["accuracy"] for h in two.history]


def test_gpu_client_actors_reused_by_the_next_run_give_the_weights_of_new_ones(tmp_path):
    import fedplatform
    from fedplatform.runtime import engine

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    fresh = run_experiment(gpu_cfg(tmp_path, 0.5, 2), tracking_uri=uri, progress=False)
    with fedplatform.reuse_actors():
        run_experiment(gpu_cfg(tmp_path, 0.5, 2, seed=4), tracking_uri=uri, progress=False)
        first = {k: a._actor_id for k, a in engine._IDLE.items()}
        reused = run_experiment(gpu_cfg(tmp_path, 0.5, 2), tracking_uri=uri, progress=False)
        assert len(first) == 2 and {k: a._actor_id for k, a in engine._IDLE.items()} == first
    assert_same_state(final_state(fresh), final_state(reused))
    assert [h["accuracy"] for h in fresh.history] == [h["accuracy"] for h in reused.history]
