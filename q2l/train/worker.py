"""The Ray Train worker loop: one rank of a training run.

Each of ``ray.num_workers`` workers builds its data shard, the model and the core ``Engine`` (DDP over gloo
on CPUs, NCCL on GPUs) and iterates ``engine.fit``. Rank 0 logs the data splits as MLflow datasets and
runs the system-metrics monitor; per epoch it writes a checkpoint folder (``q2l/packaging/checkpoint.py``),
logs it as a logged model of the run and the epoch's metrics (``step`` = epoch, 1-based; the held-out ones
linked to that model, ``q2l/tracking/checkpoint_models.py``); every rank calls ``ray.train.report`` and rank
0 attaches the folder. After the last epoch the best weights are evaluated on the test split
(``final_evaluation``) and all ranks report ``test_map`` with a final checkpoint.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from q2l import tracking
from q2l.config import Config, config_from_dict
from q2l.packaging import checkpoint
from q2l.progress import get_logger
from q2l.tracking import checkpoint_models, system_metrics
from q2l.tracking.run_record import RunRecorder
from q2l.train.epoch_report import epoch_report, log_progress
from q2l.train.failures import TrainingRunError, is_input_error, record_failure, recorded_failure
from q2l.train.final_evaluation import evaluate_best
from q2l.train.worker_run import WorkerRun

log = get_logger()


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train worker function (see the module docstring)."""
    from q2l.engine import NonFiniteLossError

    _quiet_worker()
    cfg = config_from_dict(loop_config["config"], "train_loop_config")
    if _input_failure_recorded(cfg, loop_config["launch_id"]):
        return  # a restart after an input error: it would only recur (q2l/train/failures.py)
    workdir = Path(tempfile.mkdtemp(prefix="q2l-ckpt-"))
    run: WorkerRun | None = None
    try:
        run = _build(cfg, loop_config, workdir)
        if run.meta.get("final"):
            # this run already finished (the command was re-run): report its result again, train nothing
            if run.rank == 0:
                run_id = run.meta["mlflow_run_id"]
                log.info(f"run {loop_config['run_name']} is already complete (MLflow run {run_id})")
            run.report(run.meta["final"])
            return
        _open_record(run)
        last_metrics = _train_epochs(run)
        final = evaluate_best(run, last_metrics)
        if run.rank == 0:
            checkpoint.write_meta(run.folder, {**checkpoint.read_meta(run.folder), "final": final})
        run.report(final)
        if run.recorder is not None:
            run.recorder.finish()
    except NonFiniteLossError as e:
        # every rank raises it together, and it is deterministic: restarting the workers from the last
        # checkpoint (ray.max_failures times) would only diverge again. End the run here, FAILED with the
        # error in MLflow, where the driver finds it (recorded_failure).
        if run.recorder is not None:
            run.recorder.fail(e)
    except BaseException as e:
        if is_input_error(e):
            if _end_on_input_error(cfg, loop_config, run, e):
                return
        elif run is not None and run.recorder is not None:
            run.recorder.fail(e)
        if isinstance(e, Exception) and not _picklable(e):
            # Ray unpickles a worker's exception in the controller; one it cannot rebuild (an __init__ with
            # other arguments than its message) would surface as a TypeError that hides the real error
            raise TrainingRunError(f"{type(e).__name__}: {e}") from e
        raise
    finally:
        if run is not None:  # None: building the run failed (an input error every rank met)
            system_metrics.stop(run.monitor)
        shutil.rmtree(workdir, ignore_errors=True)


def _input_failure_recorded(cfg: Config, launch_id: str) -> bool:
    failure = recorded_failure(cfg, launch_id)
    return failure is not None and failure.input_error


def _end_on_input_error(cfg: Config, loop_config: dict[str, Any], run: WorkerRun | None, error) -> bool:
    """Record an input error on the launch's MLflow run; True when this rank may end quietly.

    Before training (``run`` is None) every rank meets the same error, so each ends without a restart and
    rank 0 records it (creating the run if needed). During training an error (a bad image) is this rank's
    alone: the others wait in a collective, so it must raise; the restart Ray then makes ends at once.
    """
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    run_id = run.run_id if run is not None else None
    if run_id is None and rank == 0:
        recorder = RunRecorder(cfg)
        run_id = recorder.open(
            tracking.ensure_experiment(cfg),
            run_id=None,
            run_name=loop_config["run_name"],
            launch_id=loop_config["launch_id"],
            parent_run_id=loop_config.get("parent_run_id"),
            tags=loop_config["tags"],
        )
    if run_id is not None:
        record_failure(cfg, run_id, error)
    if rank == 0 or run is not None:
        log.info(f"stopped: {type(error).__name__}: {error}")
    return run is None or run.world == 1


def _build(cfg: Config, loop_config: dict[str, Any], workdir: Path) -> WorkerRun:
    """This rank's data, loaders and Engine, restored from the latest checkpoint when there is one."""
    import ray.train
    import torch

    from q2l.data import build_datasets, build_loader
    from q2l.data.loaders import plan_cpus
    from q2l.engine import Engine, seed_everything
    from q2l.losses import build_loss
    from q2l.models import build_model

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = _device(cfg)
    # the cores Ray reserved for this worker, split between the step and the loader workers
    plan = plan_cpus(cfg.ray.cpus_per_worker, device.type, cfg.data.num_workers)
    torch.set_num_threads(plan.threads)

    seed_everything(cfg.train.seed)  # same initial weights on every rank (DDP broadcasts rank 0's anyway)
    splits = build_datasets(cfg.data, train=True)
    loader_kw = {
        "seed": cfg.train.seed,
        "rank": rank,
        "world_size": world,
        "num_workers": plan.loader_workers,
        "device": device,  # pinned batches for a GPU; with data.decode = device, decoded there
    }
    train_loader = build_loader(splits.train, cfg.data, cfg.train.batch_size, train=True, **loader_kw)
    model = build_model(cfg.model, splits.num_classes)
    engine = Engine(model, build_loss(cfg.loss), cfg, len(train_loader), device)
    folder = workdir / "latest"
    folder.mkdir()
    run = WorkerRun(cfg, loop_config, rank, world, device, splits, loader_kw, train_loader, engine, folder)
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            checkpoint.copy_folder(d, folder)
        engine_state, _, run.meta = checkpoint.read_folder(folder)  # best weights: in the engine state
        engine.load_state_dict(engine_state)
    return run


def _device(cfg: Config):
    import torch

    if not cfg.ray.use_gpu:
        return torch.device("cpu")
    from ray.train.torch import get_device

    device = get_device()
    torch.cuda.set_device(device)
    return device


def _open_record(run: WorkerRun) -> None:
    """Rank 0 opens (or continues) the MLflow run; every rank learns its id; system metrics start.

    One system-metrics monitor per machine (MLflow's sample the whole machine): rank 0's, and on a multi-node
    run one on every other node's local rank 0, named ``node_<n>``, when every node reaches the store.
    """
    import ray.train

    from q2l.engine import all_reduce_sum, broadcast_object

    ctx = ray.train.get_context()
    local_rank, node_rank = ctx.get_local_rank(), ctx.get_node_rank()
    (nodes,) = all_reduce_sum([1.0 if local_rank == 0 else 0.0])
    node_id = f"node_{node_rank}" if nodes > 1 else None
    if run.rank == 0:
        run.recorder = _open_recorder(run)
        run.run_id = run.recorder.run_id
        run.recorder.log_datasets(run.splits, run.cfg.data.root)
        run.recorder.start_system_metrics(node_id)
        s = run.splits
        what = f"resuming after epoch {run.engine.epoch}" if run.engine.epoch else "starting"
        log.info(
            f"{what}: {len(s.train)} train / {len(s.holdout)} holdout / {len(s.test)} test images, "
            f"{s.num_classes} labels, {run.world} {_worker_kind(run.device)} worker(s), "
            f"MLflow run {run.run_id}"
        )
    run.run_id = broadcast_object(run.run_id)
    uri = tracking.tracking_uri(run.cfg)
    if run.rank != 0 and local_rank == 0 and node_id is not None and system_metrics.shared_store(uri):
        run.monitor = system_metrics.start(run.run_id, uri, node_id)


def _open_recorder(run: WorkerRun):
    """Rank 0: open (or continue) the MLflow run with params, tags and the resolved config."""
    recorder = RunRecorder(run.cfg)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # after its import, which sets INFO
    tags = {
        **run.loop_config["tags"],
        "q2l.data_fingerprint": run.splits.fingerprint,
        "q2l.worker_kind": _worker_kind(run.device),
        "q2l.num_workers": str(run.world),
    }
    recorder.open(
        tracking.ensure_experiment(run.cfg),
        run_id=run.meta.get("mlflow_run_id"),
        run_name=run.loop_config["run_name"],
        launch_id=run.loop_config["launch_id"],
        parent_run_id=run.loop_config.get("parent_run_id"),
        tags=tags,
    )
    return recorder


def _train_epochs(run: WorkerRun) -> dict[str, Any]:
    """``engine.fit`` epoch by epoch: log, checkpoint and report each; the last epoch's report."""
    from q2l.data import build_loader

    cfg, engine = run.cfg, run.engine
    holdout_loader = build_loader(
        run.splits.holdout, cfg.data, cfg.train.batch_size, train=False, **run.loader_kw
    )
    last_metrics: dict[str, Any] = {}
    walls: list[float] = []
    tick = time.perf_counter()
    for result in engine.fit(run.train_loader, holdout_loader, start_epoch=engine.epoch):
        metrics = epoch_report(result, run.run_id)  # collective (throughput summed over ranks)
        model_id = _record_epoch(run, result, metrics) if run.rank == 0 else None
        stored = run.report(metrics)
        if model_id is not None and stored is not None:
            checkpoint_models.tag_stored_path(run.recorder, model_id, stored)
        walls.append(time.perf_counter() - tick)
        tick = time.perf_counter()
        if run.rank == 0:
            log_progress(cfg, result, metrics, walls)
        last_metrics = metrics
    return last_metrics


def _record_epoch(run: WorkerRun, result, metrics: dict[str, Any]) -> str:
    """Rank 0: the checkpoint folder to disk (reported right after), its logged model and the epoch's
    metrics to MLflow, the held-out ones linked to that model and the held-out dataset; the model's id."""
    from q2l.tracking.run_record import epoch_metrics

    epoch = metrics["epoch"]
    pointer = {
        "mlflow_run_id": run.run_id,
        "epoch": epoch,
        "holdout_map": metrics["holdout_map"],
        "ray_run": f"{run.loop_config['tags']['q2l.ray_storage_path']}/{run.loop_config['run_name']}",
        "checkpoint": "the checkpoint_* folder of ray_run whose meta.json has this epoch (tag "
        f"{checkpoint_models.PATH_TAG}); Ray keeps the best ray.keep_checkpoints by holdout_map",
        "format": "q2l/packaging/checkpoint.py",
    }
    model_id = checkpoint_models.log_checkpoint_model(run.recorder, epoch, pointer)
    rates = {k: metrics[k] for k in ("images_per_s", "steady_images_per_s")}
    values = {**epoch_metrics(result), **rates}
    holdout = {k: v for k, v in values.items() if k.startswith("holdout_")}
    run.recorder.log_metrics(
        {k: v for k, v in values.items() if k not in holdout},
        step=epoch,
        linked=holdout,
        model_id=model_id,
        dataset=run.recorder.datasets.get("holdout"),
    )
    s = run.splits
    best = checkpoint.best_file_content(
        run.engine.best_weights, s.label_names, run.cfg.data.image_size, run.cfg.to_yaml()
    )
    meta = {
        "mlflow_run_id": metrics["mlflow_run_id"],
        "epoch": metrics["epoch"],
        "holdout_map": metrics["holdout_map"],
        "label_names": list(s.label_names),
        "data_fingerprint": s.fingerprint,
    }
    checkpoint.write_folder(run.folder, run.engine.state_dict(), best, meta)
    return model_id


def _quiet_worker() -> None:
    # Ray Train logs every report at INFO through a logger named by file path (so its level filter misses
    # it); the root logger at WARNING drops those and other libraries' INFO chatter in the workers. MLflow
    # draws progress bars for every artifact it downloads (logging a model does).
    logging.getLogger().setLevel(logging.WARNING)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"


def _worker_kind(device) -> str:
    import torch

    if device.type == "cuda":
        return f"gpu:{torch.cuda.get_device_name(device)}"
    return "cpu"


def _picklable(error: Exception) -> bool:
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:  # noqa: BLE001 - any failure to round-trip means Ray cannot either
        return False
    return True
