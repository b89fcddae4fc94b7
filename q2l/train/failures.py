"""What became of a training launch, read back from MLflow: a run the workers ended FAILED, or one to mark.

Every launch tags its MLflow run with a fresh launch id (``LAUNCH_TAG``), so the driver can find the run its
workers opened even when they died before reporting anything.

Input errors (bad data, annotations, images under ``on_bad_image=error``, config or model files) recur on
every attempt, so restarting the workers (``ray.max_failures``) only repeats them. A worker that meets one
ends the launch's run FAILED with ``q2l.error_kind = input``; a restarted attempt finds that record and
ends at once, and the driver raises ``TrainingInputError`` (a usage error, exit 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from q2l import tracking
from q2l.config import Config
from q2l.tracking.run_record import ERROR_TAG, LAUNCH_TAG

ERROR_KIND_TAG = "q2l.error_kind"
INPUT = "input"


class TrainingRunError(RuntimeError):
    """A training run failed; the message is the workers' error (e.g. the engine's non-finite loss)."""


class TrainingInputError(TrainingRunError):
    """A training run stopped on an input error that would recur (data, image, config, model file)."""


@dataclass
class RecordedFailure:
    """A failure the workers recorded on the launch's MLflow run."""

    run_id: str
    message: str
    input_error: bool


def is_input_error(error: BaseException) -> bool:
    """Whether ``error`` would recur on every attempt: data, image, config or model-file errors."""
    from q2l.config import ConfigError
    from q2l.data import BadImageError, DataError
    from q2l.models.pretrained import PretrainedWeightsError
    from q2l.packaging import PackagingError

    return isinstance(error, (ConfigError, DataError, BadImageError, PretrainedWeightsError, PackagingError))


def record_failure(cfg: Config, run_id: str, error: BaseException) -> None:
    """End MLflow run ``run_id`` FAILED with ``error`` (marked as an input error when it is one)."""
    tags = {ERROR_TAG: f"{type(error).__name__}: {error}"}
    if is_input_error(error):
        tags[ERROR_KIND_TAG] = INPUT
    client = tracking.client(cfg)
    tracking.log_tags(client, run_id, tags)
    client.set_terminated(run_id, "FAILED")


def launch_runs(cfg: Config, launch_id: str) -> tuple[Any, list]:
    """(client, MLflow runs of this launch); no runs when the store cannot be read."""
    client = tracking.client(cfg)
    try:
        exp = client.get_experiment_by_name(cfg.mlflow.experiment)
        runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{LAUNCH_TAG}` = '{launch_id}'")
    except Exception:  # noqa: BLE001 - reporting the training failure matters more
        return client, []
    return client, runs


def mark_failed(cfg: Config, launch_id: str, message: str) -> str | None:
    """End this launch's MLflow run FAILED if no worker did (e.g. workers killed past max_failures)."""
    client, runs = launch_runs(cfg, launch_id)
    for run in runs:
        if run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, ERROR_TAG, message)
            client.set_terminated(run.info.run_id, "FAILED")
    return runs[0].info.run_id if runs else None


def recorded_failure(cfg: Config, launch_id: str) -> RecordedFailure | None:
    """The failure the workers recorded on this launch's run when they ended it FAILED themselves."""
    _, runs = launch_runs(cfg, launch_id)
    for run in runs:
        tags = run.data.tags
        if run.info.status == "FAILED" and ERROR_TAG in tags:
            return RecordedFailure(run.info.run_id, tags[ERROR_TAG], tags.get(ERROR_KIND_TAG) == INPUT)
    return None
