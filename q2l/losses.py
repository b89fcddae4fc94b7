"""Asymmetric Loss for multi-label classification (Ridnik et al., 2021; docs/design.md §3)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from q2l.config import LossConfig

Reduction = Literal["sum", "mean", "none"]


class AsymmetricLoss(nn.Module):
    """ASL on logits, exactly the official formula (Alibaba-MIIL/ASL ``losses.py``).

    ``p = sigmoid(x)``, ``p_neg = min(1 - p + clip, 1)`` when ``clip > 0``,
    ``L = y log(max(p, eps)) + (1 - y) log(max(p_neg, eps))``, multiplied by the focusing weight
    ``(1 - pt)^(gamma_pos y + gamma_neg (1 - y))`` with ``pt = p y + p_neg (1 - y)`` when a gamma is
    positive; the weight carries no gradient (the official ``disable_torch_grad_focal_loss``).

    The loss is computed in float32 (float64 if the logits are float64) whatever the input dtype or
    autocast state: in fp16 ``eps=1e-8`` underflows and the sigmoid saturates, giving NaN.

    ``reduction``: ``"sum"`` (official: sum over batch and classes), ``"mean"`` (over the contributing
    entries) or ``"none"`` (per-entry loss, zero where a label is ignored).
    ``partial_labels``: targets ``< 0`` (``-1`` = unknown) contribute nothing. Without it, targets are
    used as given (soft targets in [0, 1], e.g. from MixUp, are fine).
    """

    def __init__(
        self,
        gamma_neg: float = 4.0,
        gamma_pos: float = 1.0,
        clip: float = 0.05,
        eps: float = 1e-8,
        reduction: Reduction = "sum",
        partial_labels: bool = False,
    ) -> None:
        super().__init__()
        if reduction not in ("sum", "mean", "none"):
            raise ValueError(f"AsymmetricLoss: reduction must be 'sum', 'mean' or 'none', got {reduction!r}")
        if gamma_neg < 0 or gamma_pos < 0:
            raise ValueError(
                f"AsymmetricLoss: gammas must be >= 0, got gamma_neg={gamma_neg}, gamma_pos={gamma_pos}"
            )
        if not 0 <= clip < 1:
            raise ValueError(f"AsymmetricLoss: clip must be in [0, 1), got {clip}")
        if eps <= 0:
            raise ValueError(f"AsymmetricLoss: eps must be > 0, got {eps}")
        self.gamma_neg = float(gamma_neg)
        self.gamma_pos = float(gamma_pos)
        self.clip = float(clip)
        self.eps = float(eps)
        self.reduction = reduction
        self.partial_labels = partial_labels

    def extra_repr(self) -> str:
        return (
            f"gamma_neg={self.gamma_neg}, gamma_pos={self.gamma_pos}, clip={self.clip}, eps={self.eps}, "
            f"reduction={self.reduction!r}, partial_labels={self.partial_labels}"
        )

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss for ``logits`` [B, K] against ``targets`` [B, K] (1 positive, 0 negative, -1 unknown)."""
        if logits.shape != targets.shape:
            raise ValueError(
                f"AsymmetricLoss: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ"
            )
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        # Leave autocast so that sigmoid/log/pow really run in `dtype`.
        with torch.autocast(device_type=logits.device.type, enabled=False):
            x = logits.to(dtype)
            y = targets.to(dtype)
            known = None
            if self.partial_labels:
                known = (y >= 0).to(dtype)
                y = y.clamp(min=0)

            p = torch.sigmoid(x)
            p_neg = 1 - p
            if self.clip > 0:
                p_neg = (p_neg + self.clip).clamp(max=1)
            loss = y * torch.log(p.clamp(min=self.eps)) + (1 - y) * torch.log(p_neg.clamp(min=self.eps))

            if self.gamma_neg > 0 or self.gamma_pos > 0:
                # The focusing weight is a constant w.r.t. the logits (official design choice).
                with torch.no_grad():
                    pt = p * y + p_neg * (1 - y)
                    gamma = self.gamma_pos * y + self.gamma_neg * (1 - y)
                    weight = torch.pow(1 - pt, gamma)
                loss = loss * weight

            loss = -loss
            if known is not None:
                loss = loss * known
            if self.reduction == "sum":
                return loss.sum()
            if self.reduction == "mean":
                if known is None:
                    return loss.mean()
                return loss.sum() / known.sum().clamp(min=1)
            return loss


def build_loss(loss_cfg: LossConfig) -> AsymmetricLoss:
    """The training loss from the ``loss`` config section (official sum reduction)."""
    return AsymmetricLoss(
        gamma_neg=loss_cfg.gamma_neg,
        gamma_pos=loss_cfg.gamma_pos,
        clip=loss_cfg.clip,
        eps=loss_cfg.eps,
        reduction="sum",
        partial_labels=loss_cfg.partial_labels,
    )
