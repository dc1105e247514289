"""Synthetic load: clients do a fixed, known amount of work on the real model payload.

For measuring the platform itself (orchestration overhead, scaling in the number of logical
clients): each client busy-waits `work_s` seconds and returns the global weights unchanged, so
payloads and uploads have the size of the configured model while the compute is known exactly.
`update_mb` adds one float32 entry of that size, drawn per client from its generator (so updates
differ and the aggregation's summation order shows in the result).
"""
from __future__ import annotations

import time

import torch

from fedplatform.algorithms.base import Algorithm, ClientData, ClientUpdate, State, register_algorithm, seeded_global_rng
from fedplatform.algorithms.fedavg import SampleWeightedAggregation
from fedplatform.algorithms.images import input_shape
from fedplatform.algorithms.synthetic_config import SyntheticConfig
from fedplatform.models.backbones import check_model_name, create_model

BALLAST = "ballast"


@register_algorithm("synthetic", config=SyntheticConfig)
class Synthetic(SampleWeightedAggregation, Algorithm):
    @classmethod
    def check(cls, cfg) -> None:
        """A known model: its payload is what the clients carry."""
        check_model_name(cfg.model.name)

    def init_server_state(self, seed: int) -> State:
        h, _, c = input_shape(self.ctx.cfg, self.ctx.image_shape)
        with seeded_global_rng(seed):
            model = create_model(self.ctx.cfg.model.name, self.ctx.num_classes, c, h)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if self.cfg.update_mb:
            state[BALLAST] = torch.zeros(int(self.cfg.update_mb * 2**20) // 4)
        return state

    def broadcast(self, state: State) -> State:
        return state

    def client_update(self, payload: State, data: ClientData, generator: torch.Generator) -> ClientUpdate:
        deadline = time.perf_counter() + self.cfg.work_s
        while time.perf_counter() < deadline:
            pass
        tensors = dict(payload)
        if BALLAST in tensors:
            tensors[BALLAST] = torch.rand(tensors[BALLAST].shape, generator=generator)
        return ClientUpdate(data.client_id, len(data.labels), tensors, {"train_loss": 0.0})

    def evaluate(self, state: State, test: ClientData) -> dict:
        return {}
