"""The exponential moving average of the weights: timm's ``ModelEmaV3``, configured for the Engine.

The EMA is updated after every optimizer step: ``ema = d·ema + (1 − d)·model`` over the floating entries
of the state dict (BatchNorm statistics included; integer buffers are copied). With a fixed d = 0.9997 the
average would remember the random initialisation for ~3,000 steps, which dominates short runs (a demo run
has a few hundred steps). So the decay warms up: ``d(s) = min(decay, 1 − s^(−3/4))`` for the s-th update
(1-based): d(1) = 0 (the first update copies the weights), d(11) ≈ 0.83, d(101) ≈ 0.97, d(1001) ≈ 0.994,
reaching 0.9997 after ~50k steps. Power 3/4 suits runs of ~100k steps or less (2/3 suits million-step
runs); the official recipe's 80 COCO epochs are ~100k steps at batch 64.

timm keeps no update count: the caller passes ``step`` (the Engine's ``global_step`` after the step, which its
checkpoint already holds), so the warm-up position has one owner and resumes with it. tests/test_engine.py
checks the configured EMA against the formula above, buffers included, and an exact resume.
"""

from __future__ import annotations

from timm.utils import ModelEmaV3
from torch import nn

WARMUP_POWER = 0.75


def build_ema(model: nn.Module, decay: float) -> ModelEmaV3:
    """An EMA copy of ``model`` (eval mode, no gradients, same device); call ``update(model, step=s)``."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"train.ema_decay = {decay!r} must be in [0, 1)")
    ema = ModelEmaV3(
        model,
        decay=decay,
        min_decay=0.0,
        update_after_step=0,
        use_warmup=True,
        warmup_gamma=1.0,
        warmup_power=WARMUP_POWER,
    )
    ema.module.requires_grad_(False)  # timm leaves the copy's parameters requiring gradients
    return ema
