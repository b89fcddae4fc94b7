"""How a sweep searches and stops: the Optuna searcher (TPE, GP or random) and the ASHA scheduler.

The searcher works on the sweep's persisted Optuna study (``study.py``) and tells Optuna how each trial
ended (``optuna_search.py``): ASHA-stopped trials are PRUNED with their per-epoch values. On ``--resume``
the restored search algorithm follows the restored trials (``resumable_search.py``). ASHA stops weak
trials at its rungs, never at the last epoch, so a surviving trial always gets its test evaluation and
logged model.
"""

from __future__ import annotations

from typing import Any

from q2l.config import Config, ConfigError
from q2l.sweep.resources import ResourcePlan
from q2l.sweep.space import SearchSpace
from q2l.train import BEST_MAP_KEY as METRIC
from q2l.train import EPOCH_KEY as TIME_ATTR


def searcher(cfg: Config, space: SearchSpace, study_name: str):
    """Tune's searcher over ``space`` in a new study ``study_name`` (seeded by ``tune.warm_start``)."""
    from q2l.sweep import study
    from q2l.sweep.optuna_search import MultiFidelityOptunaSearch

    t = cfg.tune
    storage = study.create_study(cfg, space, study_name)
    return MultiFidelityOptunaSearch(
        space,
        metric=METRIC,
        mode="max",
        sampler=study.sampler(t.searcher, t.seed, t.num_samples),
        study_name=study_name,
        storage=storage,
    )


def search_algorithm(cfg: Config, space: SearchSpace, study_name: str, max_concurrent: int):
    """The sweep's ``searcher`` at most ``max_concurrent`` trials at a time, consistent after a restore."""
    from q2l.sweep.resumable_search import ResumableSearch

    return ResumableSearch(searcher(cfg, space, study_name), max_concurrent)


def scheduler(cfg: Config):
    from ray.tune.schedulers import AsyncHyperBandScheduler

    if cfg.tune.scheduler == "none":
        return None
    epochs, grace = cfg.train.epochs, cfg.tune.grace_period
    if grace >= epochs:
        raise ConfigError(
            f"tune.grace_period = {grace} must be below train.epochs = {epochs} for ASHA to stop anything "
            f"(or set tune.scheduler = none)"
        )
    # Rungs at grace · rf^k up to epochs - 1, and no forced stop at max_t: a trial that reaches the last
    # epoch always finishes (test evaluation, logged model).
    return AsyncHyperBandScheduler(
        time_attr=TIME_ATTR,
        metric=METRIC,
        mode="max",
        max_t=epochs - 1,
        grace_period=grace,
        reduction_factor=cfg.tune.reduction_factor,
        stop_last_trials=False,
    )


def settings(cfg: Config, plan: ResourcePlan) -> dict[str, Any]:
    """The sweep's search settings, as the parent run's ``sweep.*`` params show them."""
    from q2l.sweep import study

    t = cfg.tune
    settings = {
        "searcher": study.SAMPLERS[t.searcher],
        "study_storage": study.shown_url(study.storage_url(cfg)),
        "warm_start": ", ".join(study.warm_start_names(cfg)) or "none",
        "scheduler": "asha" if t.scheduler == "asha" else "fifo",
        "metric": METRIC,
        "num_samples": t.num_samples,
        "max_concurrent_trials": plan.max_concurrent,
        "driver_resources": plan.driver,
        "worker_resources": plan.per_worker,
        "num_workers": cfg.ray.num_workers,
        "seed": t.seed,
    }
    if t.scheduler == "asha":
        settings.update({"grace_period": t.grace_period, "reduction_factor": t.reduction_factor})
    return settings
