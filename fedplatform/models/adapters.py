"""FedCLIP attention adapter (Lu et al. 2023; spec fedclip §2)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AttentionAdapter(nn.Module):
    """f = normalize(A(v) ⊙ v) with A(v) = softmax(W2 · tanh(W1 · v + b1) + b2) over the d channels.

    Both Linear(d, d) layers have bias and PyTorch's default init; no dropout, normalisation,
    bottleneck or residual: 2·(d² + d) parameters (525,312 for d = 512)."""

    def __init__(self, dim: int):
        super().__init__()
        self.attention = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, dim), nn.Softmax(dim=-1))

    def gate(self, v: torch.Tensor) -> torch.Tensor:
        """A(v): [n, d] channel weights, each row summing to 1."""
        return self.attention(v)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.gate(v) * v, dim=-1)


def gate_entropy(gate: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the gate rows; ln d for the uniform gate (= zero-shot CLIP)."""
    return -(gate * gate.clamp_min(1e-30).log()).sum(-1).mean()
