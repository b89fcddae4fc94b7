"""A sweep's trials as Tune left them, read back as leaderboard rows."""

from __future__ import annotations

import math

from q2l.config import Config, ConfigError
from q2l.ray_runtime import error_line
from q2l.sweep.leaderboard import COMPLETED, FAILED, STOPPED, TrialRow
from q2l.sweep.search import METRIC, TIME_ATTR
from q2l.sweep.space import SearchSpace
from q2l.train import FINAL_METRIC


def trial_rows(grid, base: Config, space: SearchSpace) -> list[TrialRow]:
    """Tune's results as leaderboard rows (status: failed / stopped by the scheduler / completed)."""
    rows = []
    for order, result in enumerate(grid):  # Tune lists trials in creation order
        metrics = result.metrics or {}
        sampled = dict(result.config or {})
        trial_id = metrics.get("trial_id") or _trial_id_from_path(result.path)
        try:
            values = base.replace(space.overrides(sampled)).flat()
        except (ConfigError, KeyError):
            values = {**base.flat(), **sampled}
        df = result.metrics_dataframe
        history, train_images = [], 0.0
        if df is not None and "holdout_map" in df and TIME_ATTR in df:
            # the final (test) report repeats the last epoch: one value per epoch
            by_epoch = df.dropna(subset=["holdout_map"]).groupby(TIME_ATTR).first()
            history = [float(v) for v in by_epoch["holdout_map"].tolist()]
            if "train_images" in by_epoch:
                train_images = float(by_epoch["train_images"].sum())
        if result.error is not None:
            status, error = FAILED, error_line(str(result.error))
        elif FINAL_METRIC in metrics:
            status, error = COMPLETED, None
        else:
            status, error = STOPPED, None
        rows.append(
            TrialRow(
                trial_id=trial_id,
                status=status,
                sampled=sampled,
                values=values,
                holdout_map=float(metrics.get(METRIC, math.nan)),
                test_map=float(metrics.get(FINAL_METRIC, math.nan)),
                epochs=int(metrics.get(TIME_ATTR, 0) or 0),
                history=history,
                train_images=train_images,
                run_id=metrics.get("mlflow_run_id"),
                error=error,
                order=order,
            )
        )
    return rows


def _trial_id_from_path(path: str) -> str:
    # trial folders are named by _trial_name: trial-<id>
    return path.rstrip("/").rsplit("/", 1)[-1].removeprefix("trial-")


def unfinished(sweep_path: str, num_samples: int) -> int:
    """Trials not run to an end (an interrupted sweep): never started, or neither terminated nor errored.

    Read from the state Tune saved: after an interrupt, Tune's in-memory trials all read TERMINATED.
    """
    from ray.tune import ExperimentAnalysis

    from q2l.sweep.resumable_search import FINISHED

    trials = ExperimentAnalysis(sweep_path).trials
    return num_samples - sum(t.status in FINISHED for t in trials)
