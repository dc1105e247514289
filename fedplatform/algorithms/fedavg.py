"""FedAvg (McMahan et al. 2017) with the CLIP2FL reference local training (spec §4.2, §4.3 step 1).

`local_sgd` is the reference client loop and `FedAvg.local_loss` its per-batch loss hook: FedProx,
CReFF and CLIP2FL extend the loss (proximal term, KD) without copying the loop.
"""
from __future__ import annotations

from functools import cached_property
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fedplatform.algorithms.base import (
    Algorithm,
    ClientData,
    ClientUpdate,
    State,
    draw_seed,
    evaluate_model,
    register_algorithm,
    seeded_global_rng,
)
from fedplatform.algorithms.fedavg_config import FedAvgConfig, LocalTraining
from fedplatform.algorithms.images import StudentImages, check_augmentation, input_shape, student_images
from fedplatform.algorithms.server_opt import ServerOptimizer, model_entries
from fedplatform.errors import UserError
from fedplatform.models.backbones import check_model_name, create_model

LocalLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""loss(model, x, y, index) -> scalar: x the augmented normalised batch, y its labels, index the
batch's positions in the client's data (to look up per-sample extras such as teacher logits)."""


def local_sgd(
    model: nn.Module,
    images: StudentImages,
    labels: torch.Tensor,
    train: LocalTraining,
    generator: torch.Generator,
    loss_fn: LocalLoss,
) -> float:
    """Reference local training: train mode, SGD(lr, no momentum, no weight decay), a fresh
    optimizer per call, `local_epochs` passes reshuffled by `torch.randperm(n, generator)`, batches
    of `batch_size` with the last partial one kept, `train.augmentation` per batch. `images` gives
    normalised batches on the model's device. `train.precision` bf16 runs the loss under bf16
    autocast (the loss itself is taken in fp32). Returns the mean loss over all steps.

    The step is torch.optim.SGD's own update for these settings (`sgd_step`), applied without the
    optimizer object: constructing one imports torch._dynamo, 1.3 s of CPU in every client process
    on its first client."""
    model.train()
    device = labels.device
    bf16 = train.precision == "bf16"
    params = [p for p in model.parameters() if p.requires_grad]
    n = len(labels)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    steps = 0
    for _ in range(train.local_epochs):
        order = torch.randperm(n, generator=generator, device=generator.device).to(device)
        for start in range(0, n, train.batch_size):
            index = order[start : start + train.batch_size]
            x = images.train(index, train.augmentation, generator)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(model, x, labels[index], index).float()
            for p in params:
                p.grad = None
            loss.backward()
            sgd_step(params, train.lr)
            # Accumulate on the device: a .item() per step would synchronise a GPU every batch.
            loss_sum += loss.detach()
            steps += 1
    return (loss_sum / steps).item()


@torch.no_grad()
def sgd_step(params: list[torch.Tensor], lr: float) -> None:
    """torch.optim.SGD(params, lr).step() with no momentum, weight decay or maximize, op for op:
    per tensor on the CPU, one foreach call on CUDA (what SGD's default picks there); parameters
    without a gradient are left alone."""
    params = [p for p in params if p.grad is not None]
    if params and params[0].is_cuda:
        torch._foreach_add_(params, [p.grad for p in params], alpha=-lr)
    else:
        for p in params:
            p.add_(p.grad, alpha=-lr)


class WeightedSum:
    """Streaming FedAvg: states folded in one at a time; `result()` equals `weighted_average` over
    the same sequence bit for bit (same operations in the same order), holding one sum."""

    def __init__(self):
        self.sum: State | None = None
        self.total = 0

    def add(self, state: State, weight: int) -> None:
        if self.sum is None:
            self.sum = {k: v * weight if v.is_floating_point() else v.clone() for k, v in state.items()}
        else:
            for key, acc in self.sum.items():
                if acc.is_floating_point():
                    acc.add_(state[key] * weight)
        self.total += weight

    def result(self) -> State:
        if self.sum is None:
            raise ValueError("cannot aggregate an empty list of client updates")
        return {k: v / self.total if v.is_floating_point() else v for k, v in self.sum.items()}


def weighted_average(states: list[State], weights: list[int]) -> State:
    """FedAvg: every floating entry (BN running stats included) = sum_k n_k * theta_k / sum_k n_k,
    accumulated in list order as the reference. Integer entries (BN num_batches_tracked) take the
    first state's value: the reference averages them too, which only changes a counter that the
    models here never read (spec §9.11)."""
    acc = WeightedSum()
    for state, n in zip(states, weights):
        acc.add(state, n)
    return acc.result()


class SampleWeightedAggregation:
    """The FedAvg server, streamed: updates weighted by their sample counts (`WeightedSum`)."""

    def aggregate_start(self, state: State, round: int) -> WeightedSum:
        return WeightedSum()

    def aggregate_add(self, acc: WeightedSum, update: ClientUpdate) -> None:
        acc.add(update.tensors, update.num_samples)

    def aggregate_finish(self, state: State, acc: WeightedSum, round: int) -> State:
        return acc.result()


@register_algorithm("fedavg", config=FedAvgConfig)
class FedAvg(SampleWeightedAggregation, Algorithm):
    """FedAvg: clients run `local_sgd` with cross-entropy from the broadcast model; the server takes
    the sample-weighted mean of every state entry. Defaults (reference): 10 local epochs, lr 0.1,
    batch 32, batch-shared crop/flip augmentation. The state is the model's flat state_dict, plus the
    moments of `algorithm.server_optimizer` when one steps the global model with the mean."""

    predict_head = "classifier"

    def __init__(self, ctx):
        super().__init__(ctx)
        self._model: nn.Module | None = None
        if self.cfg.precision == "bf16" and ctx.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError(f"algorithm.precision=bf16 needs a GPU with bfloat16 support (Ampere or newer); "
                            f"{torch.cuda.get_device_name(ctx.device)} has none: use precision fp32")

    @classmethod
    def check(cls, cfg) -> None:
        """A known student."""
        super().check(cfg)
        check_model_name(cfg.model.name)

    @classmethod
    def prepare(cls, cfg, dataset) -> list:
        """Driver side: the augmentation must suit how the store keeps images."""
        check_augmentation(cfg.algorithm.augmentation, dataset.image_shape is None, cfg.data.dataset)
        return []

    @cached_property
    def server_optimizer(self) -> ServerOptimizer | None:
        """`algorithm.server_optimizer` over the model's trainable parameters, or None (plain FedAvg;
        also for CReFF and CLIP2FL, whose configs have no such key)."""
        cfg = getattr(self.cfg, "server_optimizer", None)
        if cfg is None:
            return None
        with seeded_global_rng(0):
            names = {n for n, p in self.build_model().named_parameters() if p.requires_grad}
        return ServerOptimizer(cfg, names)

    @classmethod
    def inference_state(cls, state: State) -> State:
        """The network's state dict (no server optimizer moments)."""
        return model_entries(state)

    def build_model(self) -> nn.Module:
        height, _, channels = input_shape(self.ctx.cfg, self.ctx.image_shape)
        return create_model(self.ctx.cfg.model.name, self.ctx.num_classes, in_channels=channels, image_size=height)

    def working_model(self, state: State) -> nn.Module:
        """This actor's network on `ctx.device` (built once, kept between rounds), loaded with `state`."""
        if self._model is None:
            with seeded_global_rng(0):  # its initial weights are overwritten; keep the global RNG as it was
                self._model = self.build_model().to(self.ctx.device)
        self._model.load_state_dict(state)
        return self._model

    def init_server_state(self, seed: int) -> State:
        with seeded_global_rng(seed):
            model = self.build_model()
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if self.server_optimizer is not None:
            state.update(self.server_optimizer.initial_state(state))
        return state

    def broadcast(self, state: State) -> State:
        return state if self.server_optimizer is None else model_entries(state)

    def aggregate_finish(self, state: State, acc: WeightedSum, round: int) -> State:
        """The sample-weighted mean, or the server optimizer's step with it (Reddi et al. 2021)."""
        average = acc.result()
        return average if self.server_optimizer is None else self.server_optimizer.step(state, average)

    def local_loss(self, payload: State, data: ClientData) -> LocalLoss:
        """The per-batch loss of this client's local training (built once per update, so it can
        hold what it precomputes); FedAvg: cross-entropy of the logits."""

        def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(model(x), y)

        return cross_entropy

    def client_update(self, payload: State, data: ClientData, generator: torch.Generator) -> ClientUpdate:
        if len(data.labels) == 0:
            raise ValueError(f"client {data.client_id} has no training samples")
        device = self.ctx.device
        model = self.working_model(payload)
        images = student_images(data, self.ctx)
        labels = data.labels.to(device=device, dtype=torch.long)
        loss_fn = self.local_loss(payload, data)
        # Any global-RNG use inside the model (e.g. a dropout layer) is seeded from `generator` too,
        # so the update does not depend on what this actor ran before.
        with seeded_global_rng(draw_seed(generator), device):
            train_loss = local_sgd(model, images, labels, self.cfg, generator, loss_fn)
        tensors = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return ClientUpdate(data.client_id, len(labels), tensors, {"train_loss": train_loss})

    def evaluate(self, state: State, test: ClientData) -> dict:
        model = self.working_model(model_entries(state))
        return evaluate_model(model, student_images(test, self.ctx), test.labels, self.ctx)
