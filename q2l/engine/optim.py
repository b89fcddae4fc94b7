"""AdamW with weight decay only where it belongs, and the OneCycle schedule stepped per optimizer step."""

from __future__ import annotations

import math

import torch
from torch import nn

from q2l.config import OptimConfig


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of parameters that get no weight decay.

    - effectively 1-d tensors (``squeeze().ndim <= 1``): biases, norm scales/shifts, per-class biases
    stored as
      [1, K], layer scales, class tokens;
    - every ``nn.Embedding`` weight: the label query embeddings (decaying them pulls the queries to zero);
    - whatever a submodule lists in ``no_weight_decay()`` (timm's convention: position embeddings, …).
    """
    names = {n for n, p in model.named_parameters() if p.squeeze().ndim <= 1}
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(module, nn.Embedding):
            names.update(f"{dot}{n}" for n, _ in module.named_parameters())
        listed = getattr(module, "no_weight_decay", None)
        if callable(listed):
            for n in listed():
                # timm lists parameter names or name prefixes (``pos_embed``, ``blocks.0.attn``)
                names.update(
                    full
                    for full, _ in model.named_parameters()
                    if full == f"{dot}{n}" or full.startswith(f"{dot}{n}.")
                )
    return names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: ``decay`` (weight_decay) and ``no_decay`` (0), trainable parameters only."""
    skip = no_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``param_groups``; fused on CUDA unless ``optim.fused`` is False (None: CUDA only)."""
    fused = (torch.device(device).type == "cuda") if cfg.fused is None else cfg.fused
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, fused=fused or None)


def optimizer_steps_per_epoch(steps_per_epoch: int, grad_accum_steps: int) -> int:
    """Optimizer steps per epoch of ``steps_per_epoch`` batches (a last partial group still steps)."""
    return math.ceil(steps_per_epoch / grad_accum_steps)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    cfg: OptimConfig,
    epochs: int,
    steps_per_epoch: int,
    grad_accum_steps: int = 1,
) -> torch.optim.lr_scheduler.OneCycleLR:
    """OneCycleLR(max_lr=optim.lr, pct_start) over ``epochs`` × optimizer steps per epoch.

    ``steps_per_epoch`` is this rank's batch count (len of its loader): under DDP each rank sees 1/world of
    the data, so the global count would stretch the schedule world-size times (the seed's bug; docs/design.md
    §6).
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch = {steps_per_epoch} must be >= 1 (is the training loader empty?)")
    total = epochs * optimizer_steps_per_epoch(steps_per_epoch, grad_accum_steps)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=total, pct_start=_safe_pct_start(cfg.pct_start, total)
    )


def _safe_pct_start(pct_start: float, total: int) -> float:
    """``pct_start`` adjusted for short runs.

    torch's warm-up phase ends at step ``pct_start · total − 1``: exactly 0 divides by zero (e.g. 5 steps at
    0.2), below 1 skips the warm-up. Runs of 3+ steps get at least one warm-up step; 2 steps only avoid 0.
    """
    if total >= 3:
        return max(pct_start, 2.0 / total)
    return 0.75 if total == 2 else pct_start
