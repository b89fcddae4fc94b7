"""What the engine hands back: predictions, an epoch's result, the divergence error, which weights won."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from q2l.metrics import MetricSummary


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; has ``epoch``, ``step`` (batch in the epoch), ``loss``."""

    def __init__(self, epoch: int, step: int, loss: float, global_step: int):
        self.epoch, self.step, self.loss, self.global_step = epoch, step, loss, global_step
        super().__init__(
            f"non-finite loss {loss} at epoch {epoch}, step {step} (optimizer step {global_step}): the run"
            " diverged; lower optim.lr, set optim.grad_clip, or use bf16 instead of fp16"
        )

    def __reduce__(self):
        # picklable with its fields, so the error survives the trip from a Ray worker to the driver
        return (type(self), (self.epoch, self.step, self.loss, self.global_step))


@dataclass
class Predictions:
    """Sigmoid probabilities with their targets, one row per data set index (sorted, unique), on CPU."""

    scores: torch.Tensor  # [N, K] float32
    targets: torch.Tensor  # [N, K]
    indices: torch.Tensor  # [N] long


@dataclass
class EpochResult:
    """What ``Engine.fit`` yields per epoch; ``epoch`` is the 0-based index of the epoch just finished."""

    epoch: int
    train: dict[str, float]
    holdout: MetricSummary
    holdout_ema: MetricSummary | None
    best: bool  # this epoch improved the best holdout mAP (of model and EMA)
    stop: bool  # early stopping: no improvement for train.early_stop_patience epochs
    best_map: float

    @property
    def holdout_map(self) -> float:
        """The better of the model's and the EMA's holdout mAP this epoch."""
        return better_source(self.holdout, self.holdout_ema)[1]

    @property
    def best_source(self) -> str:
        """``"ema"`` or ``"model"``: whose weights scored ``holdout_map``."""
        return better_source(self.holdout, self.holdout_ema)[0]


def better_source(model: MetricSummary, ema: MetricSummary | None) -> tuple[str, float]:
    """Which weights scored the better holdout mAP, ``("ema" | "model", mAP)``: the one place that decides.

    The EMA wins only when strictly better; a NaN mAP (no class with a positive) never wins; both NaN gives
    ``("model", nan)``.
    """
    if ema is not None and not math.isnan(ema.map) and (math.isnan(model.map) or ema.map > model.map):
        return "ema", ema.map
    return "model", model.map
