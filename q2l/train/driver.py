"""The train driver: one training run as a Ray Train V2 ``TorchTrainer``, recorded in MLflow.

See docs/design.md §7 for the Ray Train V2 and MLflow rules this follows.

Each of ``ray.num_workers`` workers builds its data shard, the model and the core ``Engine`` (DDP over
gloo on CPUs, NCCL on GPUs) and iterates ``engine.fit``. Per epoch rank 0 logs to MLflow (``step`` = epoch,
1-based) and writes a checkpoint folder (engine state, best weights, MLflow run id, label names); every
rank calls ``ray.train.report`` and rank 0 attaches the folder. Ray keeps the best ``ray.keep_checkpoints`` by
``holdout_map`` plus the latest, and restarts failed workers from the latest (``ray.max_failures``).

Resuming: a run is named by ``ray.run_name`` or, when unset, by a hash of the config sections that define
the training (data, model, loss, optim, train, ray.num_workers). Re-running the same command therefore finds
the same ``(storage_path, name)`` and continues from its latest checkpoint, in the same MLflow run; a
finished run is not trained again. To start afresh, change ``ray.run_name`` (or the config).

After the last epoch the best weights (model or EMA, whichever scored the best held-out mAP) are evaluated
on the test split; rank 0 logs the test metrics, the per-class AP table and plots, the best weights and the
packaged model, and all ranks report ``test_map`` with a final checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from q2l import tracking
from q2l.config import Config
from q2l.progress import get_logger
from q2l.ray_runtime import ray_session, storage_join, worker_error
from q2l.train.failures import TrainingInputError, TrainingRunError, mark_failed, recorded_failure
from q2l.train.final_evaluation import FINAL_METRIC
from q2l.train.worker import train_loop_per_worker

_RUN_NAME_SECTIONS = ("data", "model", "loss", "optim", "train")
_PATH_KEYS = (
    "data.root",
    "data.train_annotations",
    "data.train_images",
    "data.test_annotations",
    "data.test_images",
    "data.train_file",
    "data.test_file",
    "data.cache_dir",
    "model.pretrained_path",
    "mlflow.results_dir",
    "ray.storage_path",
)

log = get_logger()


@dataclass
class TrainOutcome:
    """What a finished run produced."""

    run_name: str
    run_id: str | None  # MLflow run id
    best_holdout_map: float
    test_map: float
    checkpoint_path: str | None  # latest Ray checkpoint (holds the best weights as best.pt)
    storage_path: str
    mlflow_ui: str


def resolve_paths(cfg: Config) -> Config:
    """The config with relative local paths made absolute: workers run in other folders than the driver."""
    flat = cfg.flat()
    updates = {}
    for key in _PATH_KEYS:
        value = flat[key]
        if isinstance(value, str) and value and "://" not in value and not Path(value).is_absolute():
            updates[key] = str(Path(value).expanduser().resolve())
    return cfg.replace(updates) if updates else cfg


def default_run_name(cfg: Config) -> str:
    """``<backbone>-<hash>`` of what defines the training (so the same command resumes the same run)."""
    raw = cfg.to_dict()
    ident = {s: raw[s] for s in _RUN_NAME_SECTIONS}
    ident["ray.num_workers"] = cfg.ray.num_workers  # the schedule's steps per epoch depend on it
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:10]
    backbone = "".join(c if c.isalnum() or c in "-_" else "-" for c in cfg.model.backbone)
    return f"{backbone}-{digest}"


def build_trainer(
    cfg: Config,
    *,
    run_name: str,
    storage_path: str | None = None,
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    callbacks: Sequence[Any] = (),
):
    """A ``TorchTrainer`` for one run of ``cfg`` (not started); ``callbacks`` are Ray Train callbacks.

    ``parent_run_id`` tags the MLflow run as a child (``mlflow.parentRunId``); ``extra_tags`` are set on it.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = resolve_paths(cfg)
    storage = storage_path or cfg.ray.storage_path
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    rc = cfg.ray
    tags = {
        "q2l.ray_run_name": run_name,
        "q2l.ray_storage_path": storage,
        "q2l.num_workers": str(rc.num_workers),
        **(extra_tags or {}),
    }
    commit = tracking.git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    loop_config = {
        "config": cfg.to_dict(),
        "run_name": run_name,
        "launch_id": uuid.uuid4().hex,
        "parent_run_id": parent_run_id,
        "tags": tags,
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=rc.num_workers,
            use_gpu=rc.use_gpu,
            resources_per_worker={"CPU": rc.cpus_per_worker, **rc.resources_per_worker},
        ),
        torch_config=TorchConfig(backend="nccl" if rc.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=rc.keep_checkpoints,
                checkpoint_score_attribute="holdout_map",
                checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=rc.max_failures),
            callbacks=list(callbacks),
            # Ray Train's own INFO chatter (worker group start/stop, retry decisions) stays in its log files
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )


def check_data_paths(cfg: Config) -> None:
    """Raise ``DataError`` when a file or folder the data config names is missing (before Ray starts)."""
    from q2l.data import DataError
    from q2l.data.build import coco_paths

    d = cfg.data
    named = {"data.root": d.root}
    if d.format == "coco":
        train_ann, _, test_ann, _ = coco_paths(d)
        named.update({"data.train_annotations": str(train_ann), "data.test_annotations": str(test_ann)})
    elif d.format == "csv":
        named.update({"data.train_file": d.train_file, "data.test_file": d.test_file})
    for key, path in named.items():
        if path and not Path(path).exists():
            hint = " (make the demo set with `q2l data demo`)" if d.format == "coco" else ""
            raise DataError(f"{path}: not found ({key}){hint}")


def run_training(cfg: Config) -> TrainOutcome:
    """Train one run of ``cfg`` on Ray (``RAY_ADDRESS`` or a local Ray) and record it in MLflow.

    The MLflow store (``TrackingUnavailableError``) and the data paths (``DataError``) are checked before
    any worker starts. Prints one line per epoch (from rank 0) and, at the end, how to open the MLflow UI.
    Raises ``TrainingRunError`` with the workers' error when the run fails; its checkpoints stay in the Ray
    storage.
    """
    cfg = resolve_paths(cfg)
    run_name = cfg.ray.run_name or default_run_name(cfg)
    tracking.check_reachable(cfg)
    check_data_paths(cfg)
    with ray_session():
        trainer = build_trainer(cfg, run_name=run_name)
        storage = trainer.run_config.storage_path
        log.info(f"run {run_name}: {cfg.ray.num_workers} worker(s), checkpoints in {storage}/{run_name}")
        result = _fit(cfg, trainer, run_name, storage)
    metrics = result.metrics or {}
    outcome = TrainOutcome(
        run_name=run_name,
        run_id=metrics.get("mlflow_run_id"),
        best_holdout_map=float(metrics.get("best_holdout_map", math.nan)),
        test_map=float(metrics.get(FINAL_METRIC, math.nan)),
        checkpoint_path=result.checkpoint.path if result.checkpoint else None,
        storage_path=storage,
        mlflow_ui=tracking.ui_command(cfg),
    )
    log.info(
        f"done: best holdout mAP {outcome.best_holdout_map:.2f}, test mAP {outcome.test_map:.2f}, "
        f"MLflow run {outcome.run_id}"
    )
    log.info(f"checkpoint: {outcome.checkpoint_path}")
    log.info(f"see the run: {outcome.mlflow_ui}")
    return outcome


def _fit(cfg: Config, trainer, run_name: str, storage: str):
    """``trainer.fit()``; a failure (raised by Ray, or recorded by the workers) → ``TrainingRunError``."""
    from ray.train import TrainingFailedError

    launch_id = trainer.train_loop_config["launch_id"]
    try:
        result = trainer.fit()
    except TrainingFailedError as e:
        failure = recorded_failure(cfg, launch_id)
        if failure is not None and failure.input_error:
            raise TrainingInputError(_failed(run_name, storage, failure.message, failure.run_id)) from None
        message = worker_error(e)
        raise TrainingRunError(
            _failed(run_name, storage, message, mark_failed(cfg, launch_id, message))
        ) from None
    failure = recorded_failure(cfg, launch_id) if FINAL_METRIC not in (result.metrics or {}) else None
    if failure is not None:  # no final report: the workers ended the run FAILED themselves
        error = TrainingInputError if failure.input_error else TrainingRunError
        raise error(_failed(run_name, storage, failure.message, failure.run_id))
    return result


def _failed(run_name: str, storage: str, message: str, run_id: str | None) -> str:
    """The one-line report of a failed run: the error, the kept checkpoints (if any), the MLflow run."""
    notes = []
    if _has_checkpoints(storage_join(storage, run_name)):
        notes.append(f"checkpoints kept in {storage}/{run_name}")
    if run_id:
        notes.append(f"MLflow run {run_id} marked FAILED")
    return f"training run {run_name} failed: {message}" + (f" ({'; '.join(notes)})" if notes else "")


def _has_checkpoints(run_dir: str) -> bool:
    """Whether Ray Train kept a checkpoint folder (``checkpoint_*``) for this run."""
    import pyarrow.fs

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(
            run_dir if "://" in run_dir else str(Path(run_dir).resolve())
        )
        infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    except (OSError, ValueError):
        return False
    return any(
        i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith("checkpoint_") for i in infos
    )
