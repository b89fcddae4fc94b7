"""What a training epoch reports: the metrics every rank sends to Ray, and rank 0's progress line."""

from __future__ import annotations

import math
from typing import Any

from q2l.config import Config
from q2l.engine import all_reduce_sum
from q2l.progress import get_logger

log = get_logger()

EPOCH_KEY = "epoch"  # in every report: the 1-based count of finished epochs (Tune's time attribute)
BEST_MAP_KEY = "best_holdout_map"  # in every report: the best held-out mAP so far (what sweeps optimise)


def epoch_report(result, run_id: str | None) -> dict[str, Any]:
    """The metrics every rank reports to Ray for one epoch (the train layer's contract with Tune).

    Collective: throughput is summed over ranks (each rank's own images / s), so every rank must call it.
    """
    train = result.train
    steady = float(train.get("steady_images_per_s", math.nan))
    images, steady_sum = all_reduce_sum([float(train["images"]), 0.0 if math.isnan(steady) else steady])
    seconds = float(train["seconds"])
    ema_map = result.holdout_ema.map if result.holdout_ema is not None else math.nan
    return {
        EPOCH_KEY: result.epoch + 1,
        "holdout_map": float(result.holdout_map),
        "holdout_map_model": float(result.holdout.map),
        "holdout_map_ema": float(ema_map),
        BEST_MAP_KEY: float(result.best_map),
        "train_loss": float(train["loss"]),
        "lr": float(train["lr"]),
        "train_images": images,
        "images_per_s": images / seconds if seconds > 0 else math.nan,
        "steady_images_per_s": steady_sum if steady_sum > 0 else math.nan,
        "epoch_seconds": seconds,
        "mlflow_run_id": run_id,
    }


def duration(seconds: float) -> str:
    """``1h02m`` / ``3m05s``; ``?`` when unknown."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def log_progress(cfg: Config, result, metrics: dict, walls: list[float]) -> None:
    """Rank 0: one line per epoch with loss, held-out mAP, speed and the time left."""
    epochs = cfg.train.epochs
    step = result.epoch + 1
    eta = 0.0 if result.stop else sum(walls) / len(walls) * (epochs - step)
    ema = f", ema {metrics['holdout_map_ema']:.2f}" if not math.isnan(metrics["holdout_map_ema"]) else ""
    log.info(
        f"epoch {step}/{epochs}  loss {metrics['train_loss']:.4f}  holdout mAP {metrics['holdout_map']:.2f}"
        f" (model {metrics['holdout_map_model']:.2f}{ema}; best {metrics['best_holdout_map']:.2f})"
        f"  {metrics['images_per_s']:.1f} img/s  epoch {duration(walls[-1])}  ETA {duration(eta)}"
        + ("  early stop" if result.stop else "")
    )
