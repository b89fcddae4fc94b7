"""One sweep trial, run inside a Tune trial actor: the base config with the sampled values, on Ray Train."""

from __future__ import annotations

from typing import Any

from q2l.config import config_from_dict
from q2l.ray_runtime import worker_error
from q2l.sweep import record as sweep_record
from q2l.sweep.space import SearchSpace
from q2l.sweep.storage import join


class TrialSetupError(ValueError):
    """A trial's config cannot work (e.g. a backbone timm does not know); raised before workers start."""


def run_trial(
    config: dict[str, Any], *, base: dict[str, Any], space: SearchSpace, sweep: dict[str, str]
) -> None:
    """One trial (in a Tune trial actor): the base config with the sampled values, fitted on Ray Train."""
    import timm
    from ray import tune
    from ray.train import TrainingFailedError
    from ray.tune.integration.ray_train import TuneReportCallback

    from q2l.train import FINAL_METRIC, build_trainer, recorded_failure

    trial_id = tune.get_context().get_trial_id()
    cfg = config_from_dict(base, "sweep base config").replace(space.overrides(config), f"trial {trial_id}")
    if not timm.is_model(cfg.model.backbone):
        # fail now, not after starting (and restarting, ray.max_failures times) every worker
        raise TrialSetupError(
            f"model.backbone: {cfg.model.backbone!r} is not a timm model name (see timm.list_models())"
        )
    trainer = build_trainer(
        cfg,
        run_name=f"trial-{trial_id}",
        storage_path=join(sweep["path"], "trials"),
        parent_run_id=sweep["parent_run_id"],
        extra_tags={sweep_record.TRIAL_TAG: trial_id, sweep_record.SWEEP_TAG: sweep["name"]},
        callbacks=[TuneReportCallback()],
    )
    try:
        result = trainer.fit()
    except TrainingFailedError as e:
        raise RuntimeError(f"trial {trial_id} failed: {worker_error(e)}") from None
    if FINAL_METRIC not in (result.metrics or {}):  # no final report: stopped by the scheduler, or diverged
        failure = recorded_failure(cfg, trainer.train_loop_config["launch_id"])
        if failure is not None:
            raise RuntimeError(f"trial {trial_id} failed: {failure.message}")


def trial_name(trial) -> str:
    return f"trial-{trial.trial_id}"
