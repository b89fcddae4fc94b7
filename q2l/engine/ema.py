"""Exponential moving average of a model's weights, with a decay warm-up.

The EMA is updated after every optimizer step: ``ema = d·ema + (1 − d)·model`` over floating parameters and
buffers (BatchNorm statistics included; integer buffers are copied). With a fixed d = 0.9997 the average would
remember the random initialisation for ~3,000 steps, which dominates short runs (a demo run has a few hundred
steps). So, as timm's ``ModelEmaV3`` (and diffusers' EMA), the decay warms up:
``d(t) = min(decay, 1 − (1 + t)^(−power))`` with t the number of updates so far: d(0) = 0 (the first update
copies the weights), d(10) ≈ 0.83, d(100) ≈ 0.97, d(1000) ≈ 0.994, reaching 0.9997 after ~50k steps. power
= 3/4 is the value recommended for runs of ~100k steps or less (2/3 suits million-step runs); the official
recipe's 80 COCO epochs are ~100k steps at batch 64.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class ModelEma:
    """EMA copy of ``model`` (eval mode, no gradients); decay warm-up ``warmup_power`` (None: off)."""

    def __init__(self, model: nn.Module, decay: float, warmup_power: float | None = 0.75):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"train.ema_decay = {decay!r} must be in [0, 1)")
        self.decay = decay
        self.warmup_power = warmup_power
        self.updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self._pairs(model)  # fail early if the copy does not match

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple]]:
        ema_state = dict(self.module.named_parameters()) | dict(self.module.named_buffers())
        src_state = dict(model.named_parameters()) | dict(model.named_buffers())
        if ema_state.keys() != src_state.keys():
            raise ValueError("ModelEma: the model's parameters and buffers differ from the EMA copy's")
        floats_e, floats_s, others = [], [], []
        for name, e in ema_state.items():
            s = src_state[name]
            if e.is_floating_point():
                floats_e.append(e)
                floats_s.append(s.detach())
            else:
                others.append((e, s))
        return floats_e, floats_s, others

    def current_decay(self) -> float:
        """The decay the next update will use."""
        if self.warmup_power is None:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + self.updates) ** -self.warmup_power)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend ``model`` (the unwrapped module: not DDP, not compiled) into the average."""
        decay = self.current_decay()
        floats_e, floats_s, others = self._pairs(model)
        # one fused kernel per tensor list: ema += (1 - d) * (model - ema)
        torch._foreach_lerp_(floats_e, floats_s, 1.0 - decay)
        for e, s in others:
            e.copy_(s)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        """Weights and update count (the decay warm-up position)."""
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
