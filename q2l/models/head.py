"""Group-wise linear classifier: one weight vector per label query (official Query2Label head)."""

from __future__ import annotations

import math

import torch
from torch import nn


class GroupWiseLinear(nn.Module):
    """``logit[b, k] = Σ_d W[k, d] · h[b, k, d] + b[k]`` for query outputs ``h`` [B, K, d]."""

    def __init__(self, num_classes: int, hidden_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.hidden_dim = hidden_dim
        self.weight = nn.Parameter(torch.empty(num_classes, hidden_dim))
        self.bias = nn.Parameter(torch.empty(num_classes)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same uniform(±1/√d) init as the official code (and nn.Linear).
        bound = 1.0 / math.sqrt(self.hidden_dim)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` [B, K, d] -> logits [B, K]."""
        logits = (h * self.weight).sum(-1)
        if self.bias is not None:
            logits = logits + self.bias
        return logits
