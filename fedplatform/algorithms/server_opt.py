"""Server optimizers for the FedAvg family (Reddi et al. 2021, "Adaptive Federated Optimization").

The round's sample-weighted average x̄ gives the pseudo-gradient Δ_t = x̄ - x_t, and FedAvgM, FedAdam
or FedYogi (`algorithm.server_optimizer`) steps the global model x_t with it instead of taking x̄.
Only trainable float parameters are stepped: they are what Δ is a gradient of. BatchNorm running
statistics (float buffers estimated, not learned) and integer buffers take the plain average, as
in FedAvg. The optimizer's moments are entries of the server state under `server_optimizer.`, so a
checkpoint holds them and a resumed run continues bit-identically; they never reach the clients.
"""
from __future__ import annotations

import torch

from fedplatform.algorithms.server_opt_config import FedAdamConfig, FedAvgMConfig, FedYogiConfig

State = dict[str, torch.Tensor]
PREFIX = "server_optimizer."


def model_entries(state: State) -> State:
    """`state` without the server optimizer's moments (what clients, evaluation and exports see)."""
    return {k: v for k, v in state.items() if not k.startswith(PREFIX)}


class ServerOptimizer:
    """One of FedAvgM, FedAdam, FedYogi over the parameters named in `parameters`, following Reddi
    et al. 2021, Algorithm 2 (m_{-1} = 0, v_{-1} = tau^2, no bias correction; FedAvgM: v_{-1} = 0)."""

    def __init__(self, cfg: FedAvgMConfig | FedAdamConfig | FedYogiConfig, parameters: set[str]):
        self.cfg = cfg
        self.parameters = parameters

    def moments(self) -> tuple[str, ...]:
        return ("momentum",) if self.cfg.name == "fedavgm" else ("m", "v")

    def initial_state(self, model: State) -> State:
        """The moments before round 1: zeros, and tau^2 for FedAdam's and FedYogi's v."""
        out = {}
        for name in self.stepped(model):
            for moment in self.moments():
                fill = self.cfg.tau ** 2 if moment == "v" else 0.0
                out[f"{PREFIX}{moment}.{name}"] = torch.full_like(model[name], fill)
        return out

    def stepped(self, model: State) -> list[str]:
        """The entries this optimizer steps, in the state's order: trainable float parameters."""
        return [k for k, v in model.items() if k in self.parameters and v.is_floating_point()]

    def step(self, state: State, average: State) -> State:
        """The new server state from the current one (x_t and the moments) and this round's average."""
        cfg = self.cfg
        new = dict(average)
        for name in self.stepped(average):
            x = state[name]
            delta = average[name] - x
            if cfg.name == "fedavgm":
                v = cfg.momentum * state[f"{PREFIX}momentum.{name}"] + delta
                new[name] = x + cfg.lr * v
                new[f"{PREFIX}momentum.{name}"] = v
                continue
            m = cfg.beta1 * state[f"{PREFIX}m.{name}"] + (1 - cfg.beta1) * delta
            v, d2 = state[f"{PREFIX}v.{name}"], delta * delta
            if cfg.name == "fedadam":
                v = cfg.beta2 * v + (1 - cfg.beta2) * d2
            else:  # fedyogi
                v = v - (1 - cfg.beta2) * d2 * torch.sign(v - d2)
            new[name] = x + cfg.lr * m / (v.sqrt() + cfg.tau)
            new[f"{PREFIX}m.{name}"], new[f"{PREFIX}v.{name}"] = m, v
        return new
