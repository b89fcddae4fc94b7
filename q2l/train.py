"""The train layer: one training run as a Ray Train V2 ``TorchTrainer``, recorded in MLflow (DESIGN §7).

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
import logging
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from q2l import tracking
from q2l.config import Config, config_from_dict

ENGINE_FILE = "engine.pt"
BEST_FILE = "best.pt"
META_FILE = "meta.json"
FAULT_ENV = "Q2L_TEST_FAULT"  # fault injection for the failure tests, see _FaultHook
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

log = logging.getLogger(__name__)


class TrainingRunError(RuntimeError):
    """A training run failed; the message is the workers' error (e.g. the engine's non-finite loss)."""


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


# ------------------------------------------------------------------------------------------------- driver
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
        "fault": os.environ.get(FAULT_ENV),
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


def _connect_ray() -> bool:
    """Join ``RAY_ADDRESS`` or start a quiet local Ray; False when the caller had initialised Ray."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
        return True
    # Worker processes inherit these from the raylet this call starts (see local_ray_env).
    for key, value in local_ray_env().items():
        os.environ.setdefault(key, value)
    ray.init(include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING)
    return True


def local_ray_env() -> dict[str, str]:
    """Environment for a local Ray started by q2l (set before ``ray.init``; its processes inherit it).

    - ``RAY_API_SERVER_ADDRESS``: Ray Train's placement-group cleaner asks the state API whether the train
      controller is alive. It finds the API server by auto-detection, which can pick another Ray instance on
      the same machine (the last ``ray start``); that one does not know our controller, so the cleaner
      removes our placement group and kills the workers mid-run. Without a dashboard our Ray has no API
      server anyway: pointing at a closed port makes the cleaner's check fail harmlessly instead.
    - ``RAY_LOGGER_LEVEL=error``: that failing check warns every second.
    - ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0``: nothing to watch on one machine; it logs an object-store
      warning at start.
    """
    return {
        "RAY_API_SERVER_ADDRESS": "http://127.0.0.1:1",
        "RAY_LOGGER_LEVEL": "error",
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    }


def error_line(text: str) -> str:
    """The most telling line of an error text (a Ray traceback): the last ``SomeError: message`` line."""
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    pattern = re.compile(r"^([\w.]+(Error|Exception|Interrupt)|\w+Error\(.*)")
    for line in reversed(lines):
        if pattern.match(line):
            return line
    return lines[-1] if lines else "unknown error"


def worker_error(err: BaseException) -> str:
    """The workers' own error line from a Ray Train failure (rank 0 first)."""
    failures = getattr(err, "worker_failures", None) or {}
    texts = [str(failures[r]) for r in sorted(failures)] or [str(err)]
    return error_line(texts[0])


def _launch_runs(cfg: Config, launch_id: str) -> tuple[Any, list]:
    """(client, MLflow runs of this launch); no runs when the store cannot be read."""
    from q2l.record import LAUNCH_TAG

    client = tracking.client(cfg)
    try:
        exp = client.get_experiment_by_name(cfg.mlflow.experiment)
        runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{LAUNCH_TAG}` = '{launch_id}'")
    except Exception:  # noqa: BLE001 - reporting the training failure matters more
        return client, []
    return client, runs


def _mark_failed(cfg: Config, launch_id: str, message: str) -> str | None:
    """End this launch's MLflow run FAILED if no worker did (e.g. workers killed past max_failures)."""
    from q2l.record import ERROR_TAG

    client, runs = _launch_runs(cfg, launch_id)
    for run in runs:
        if run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, ERROR_TAG, message)
            client.set_terminated(run.info.run_id, "FAILED")
    return runs[0].info.run_id if runs else None


def recorded_failure(cfg: Config, launch_id: str) -> tuple[str, str] | None:
    """(MLflow run id, error) when the workers ended this launch's run FAILED themselves (a divergence)."""
    from q2l.record import ERROR_TAG

    _, runs = _launch_runs(cfg, launch_id)
    for run in runs:
        if run.info.status == "FAILED" and ERROR_TAG in run.data.tags:
            return run.info.run_id, run.data.tags[ERROR_TAG]
    return None


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
    from ray.train import TrainingFailedError

    cfg = resolve_paths(cfg)
    run_name = cfg.ray.run_name or default_run_name(cfg)
    tracking.check_reachable(cfg)
    check_data_paths(cfg)
    started = _connect_ray()
    try:
        trainer = build_trainer(cfg, run_name=run_name)
        storage = trainer.run_config.storage_path
        _say(f"run {run_name}: {cfg.ray.num_workers} worker(s), checkpoints in {storage}/{run_name}")
        try:
            result = trainer.fit()
        except TrainingFailedError as e:
            message = worker_error(e)
            run_id = _mark_failed(cfg, trainer.train_loop_config["launch_id"], message)
            where = f"; MLflow run {run_id} marked FAILED" if run_id else ""
            raise TrainingRunError(
                f"training run {run_name} failed: {message} (checkpoints kept in {storage}/{run_name}{where})"
            ) from None
    finally:
        if started:
            import ray

            ray.shutdown()
    metrics = result.metrics or {}
    launch_id = trainer.train_loop_config["launch_id"]
    failure = recorded_failure(cfg, launch_id) if "test_map" not in metrics else None  # no final report
    if failure is not None:
        raise TrainingRunError(
            f"training run {run_name} failed: {failure[1]} (checkpoints kept in {storage}/{run_name}; "
            f"MLflow run {failure[0]} marked FAILED)"
        )
    outcome = TrainOutcome(
        run_name=run_name,
        run_id=metrics.get("mlflow_run_id"),
        best_holdout_map=float(metrics.get("best_holdout_map", math.nan)),
        test_map=float(metrics.get("test_map", math.nan)),
        checkpoint_path=result.checkpoint.path if result.checkpoint else None,
        storage_path=storage,
        mlflow_ui=tracking.ui_command(cfg),
    )
    _say(
        f"done: best holdout mAP {outcome.best_holdout_map:.2f}, test mAP {outcome.test_map:.2f}, "
        f"MLflow run {outcome.run_id}"
    )
    _say(f"checkpoint: {outcome.checkpoint_path}")
    _say(f"see the run: {outcome.mlflow_ui}")
    return outcome


def _say(line: str) -> None:
    # sys.stdout directly: Ray Train replaces print() in workers with a logger at INFO, which we silence
    sys.stdout.write(f"[q2l] {line}\n")
    sys.stdout.flush()


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ------------------------------------------------------------------------------------------------- worker
class _FaultHook:
    """Test-only fault injection from ``Q2L_TEST_FAULT`` (read on the driver, passed to the workers).

    ``kill:RANK:EPOCH:MARKER`` SIGKILLs worker RANK halfway through epoch EPOCH (1-based), once Ray has
    registered the checkpoints reported so far, unless the file MARKER exists (it is created first, so the
    fault happens once); ``nan:EPOCH`` turns a weight into NaN halfway through epoch EPOCH on every rank, so
    the next loss is non-finite.
    """

    def __init__(self, spec: str | None, rank: int):
        self.kind, self.rank, self.epoch, self.marker = None, -1, -1, None
        if not spec:
            return
        parts = spec.split(":")
        try:
            if parts[0] == "kill" and len(parts) == 4:
                self.kind, self.rank, self.epoch, self.marker = "kill", int(parts[1]), int(parts[2]), parts[3]
            elif parts[0] == "nan" and len(parts) == 2:
                self.kind, self.rank, self.epoch = "nan", rank, int(parts[1])
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"{FAULT_ENV}={spec!r}: expected kill:RANK:EPOCH:MARKER or nan:EPOCH") from None
        self.my_rank = rank
        self.model = None

    def __call__(self, progress: dict[str, Any]) -> None:
        """Engine progress callback (after every training batch)."""
        if (
            self.kind is None
            or progress["epoch"] + 1 != self.epoch
            or progress["step"] != progress["steps"] // 2
        ):
            return
        if self.kind == "kill" and self.my_rank == self.rank and not os.path.exists(self.marker):
            import ray.train

            # Ray registers a reported checkpoint when its controller next polls the workers (every ~2 s):
            # wait for that, so the test's worker dies after the last checkpoint, not in that window
            ray.train.get_all_reported_checkpoints(timeout_s=120)
            Path(self.marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)
        if self.kind == "nan":
            import torch

            with torch.no_grad():
                next(self.model.parameters()).fill_(math.nan)


def _quiet_worker() -> None:
    # Ray Train logs every report at INFO through a logger named by file path (so its level filter misses
    # it); the root logger at WARNING drops those and other libraries' INFO chatter in the workers. MLflow
    # draws progress bars for every artifact it downloads (logging a model does).
    logging.getLogger().setLevel(logging.WARNING)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"


def _load_restored(checkpoint, local_dir: Path) -> tuple[dict, dict, dict]:
    """Copy a Ray checkpoint's files to ``local_dir``; return (engine state, best weights, meta)."""
    from q2l.engine import load_checkpoint

    with checkpoint.as_directory() as d:
        for name in (ENGINE_FILE, BEST_FILE, META_FILE):
            shutil.copy2(Path(d) / name, local_dir / name)
    meta = json.loads((local_dir / META_FILE).read_text())
    return load_checkpoint(local_dir / ENGINE_FILE), load_checkpoint(local_dir / BEST_FILE), meta


def _state_on_cpu(module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _worker_kind(device) -> str:
    import torch

    if device.type == "cuda":
        return f"gpu:{torch.cuda.get_device_name(device)}"
    return "cpu"


def _allreduce_sum(values: list[float]) -> list[float]:
    """Sum ``values`` over ranks (identity without a process group)."""
    import torch
    import torch.distributed as dist

    from q2l.engine import is_distributed

    if not is_distributed() or dist.get_world_size() == 1:
        return values
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.cpu().tolist()


def _broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    import torch.distributed as dist

    from q2l.engine import is_distributed

    if not is_distributed() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train worker function (see the module docstring)."""
    import ray.train
    import torch

    from q2l.data import build_datasets, build_loader
    from q2l.data.loaders import plan_cpus
    from q2l.engine import Engine, NonFiniteLossError, save_checkpoint, seed_everything
    from q2l.losses import build_loss
    from q2l.models import build_model

    _quiet_worker()
    cfg = config_from_dict(loop_config["config"], "train_loop_config")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.ray.use_gpu:
        from ray.train.torch import get_device

        device = get_device()
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    # the cores Ray reserved for this worker, split between the step and the loader workers
    plan = plan_cpus(cfg.ray.cpus_per_worker, device.type, cfg.data.num_workers)
    torch.set_num_threads(plan.threads)
    fault = _FaultHook(loop_config.get("fault"), rank)

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
    holdout_loader = build_loader(splits.holdout, cfg.data, cfg.train.batch_size, train=False, **loader_kw)
    model = build_model(cfg.model, splits.num_classes)
    engine = Engine(model, build_loss(cfg.loss), cfg, len(train_loader), device, progress=fault)
    fault.model = engine.model

    workdir = Path(tempfile.mkdtemp(prefix="q2l-ckpt-"))
    latest = workdir / "latest"
    latest.mkdir()
    best: dict[str, Any] | None = None
    meta: dict[str, Any] = {}
    restored = ray.train.get_checkpoint()
    if restored is not None:
        engine_state, best, meta = _load_restored(restored, latest)
        engine.load_state_dict(engine_state)
        del engine_state
    if meta.get("final"):
        # this run already finished (the command was re-run): report its result again, train nothing
        if rank == 0:
            _say(f"run {loop_config['run_name']} is already complete (MLflow run {meta['mlflow_run_id']})")
        ray.train.report(meta["final"])
        shutil.rmtree(workdir, ignore_errors=True)
        return

    recorder = None
    try:
        run_id = None
        if rank == 0:
            recorder = _open_record(cfg, loop_config, meta.get("mlflow_run_id"), splits, device, world)
            run_id = recorder.run_id
            start = engine.epoch
            what = f"resuming after epoch {start}" if start else "starting"
            _say(
                f"{what}: {len(splits.train)} train / {len(splits.holdout)} holdout / {len(splits.test)} test"
                f" images, {splits.num_classes} labels, {world} {_worker_kind(device)} worker(s),"
                f" MLflow run {run_id}"
            )
        run_id = _broadcast(run_id)
        last_metrics: dict[str, Any] = {}
        epoch_walls: list[float] = []
        tick = time.perf_counter()
        for result in engine.fit(train_loader, holdout_loader, start_epoch=engine.epoch):
            step = result.epoch + 1
            if result.best or best is None:
                use_ema = result.holdout_ema is not None and result.holdout_ema.map > result.holdout.map
                best = {
                    "model": _state_on_cpu(engine.ema.module if use_ema else engine.model),
                    "source": "ema" if use_ema else "model",
                    "epoch": step,
                    "holdout_map": float(result.holdout_map),
                }
            metrics = _epoch_report(result, run_id)  # collective (throughput summed over ranks)
            if rank == 0:
                from q2l.record import epoch_metrics

                rates = {k: metrics[k] for k in ("images_per_s", "steady_images_per_s")}
                recorder.log_metrics({**epoch_metrics(result), **rates}, step=step)
                _write_checkpoint(latest, engine.state_dict(), best, splits, metrics, cfg, save_checkpoint)
            ckpt = ray.train.Checkpoint.from_directory(str(latest)) if rank == 0 else None
            ray.train.report(metrics, checkpoint=ckpt)
            epoch_walls.append(time.perf_counter() - tick)
            tick = time.perf_counter()
            if rank == 0:
                _progress_line(cfg, result, metrics, epoch_walls)
            last_metrics = metrics

        final = _finish(cfg, engine, splits, best, loader_kw, recorder, run_id, last_metrics, meta)
        if rank == 0:
            meta_path = latest / META_FILE
            saved = json.loads(meta_path.read_text())
            saved["final"] = final
            meta_path.write_text(json.dumps(saved))
        ckpt = ray.train.Checkpoint.from_directory(str(latest)) if rank == 0 else None
        ray.train.report(final, checkpoint=ckpt)
        if recorder is not None:
            recorder.finish()
    except NonFiniteLossError as e:
        # every rank raises it together, and it is deterministic: restarting the workers from the last
        # checkpoint (ray.max_failures times) would only diverge again. End the run here, FAILED with the
        # error in MLflow, where the driver finds it (recorded_failure).
        if recorder is not None:
            recorder.fail(e)
    except BaseException as e:
        if recorder is not None:
            recorder.fail(e)
        if isinstance(e, Exception) and not _picklable(e):
            # Ray unpickles a worker's exception in the controller; one it cannot rebuild (an __init__ with
            # other arguments than its message) would surface as a TypeError that hides the real error
            raise TrainingRunError(f"{type(e).__name__}: {e}") from e
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _picklable(error: Exception) -> bool:
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
    except Exception:  # noqa: BLE001 - any failure to round-trip means Ray cannot either
        return False
    return True


def _open_record(cfg: Config, loop_config: dict, run_id: str | None, splits, device, world: int):
    """Rank 0: open (or continue) the MLflow run with params, tags and the resolved config."""
    from q2l.record import RunRecorder

    recorder = RunRecorder(cfg)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # after its import, which sets INFO
    tags = {
        **loop_config["tags"],
        "q2l.data_fingerprint": splits.fingerprint,
        "q2l.worker_kind": _worker_kind(device),
        "q2l.num_workers": str(world),
    }
    recorder.open(
        tracking.ensure_experiment(cfg),
        run_id=run_id,
        run_name=loop_config["run_name"],
        launch_id=loop_config["launch_id"],
        parent_run_id=loop_config.get("parent_run_id"),
        tags=tags,
    )
    return recorder


def _epoch_report(result, run_id: str) -> dict[str, Any]:
    """The metrics every rank reports to Ray for one epoch (the train-layer contract).

    Collective: throughput is summed over ranks (each rank's own images / s), so every rank must call it.
    """
    train = result.train
    steady = float(train.get("steady_images_per_s", math.nan))
    images, steady_sum = _allreduce_sum([float(train["images"]), 0.0 if math.isnan(steady) else steady])
    seconds = float(train["seconds"])
    ema_map = result.holdout_ema.map if result.holdout_ema is not None else math.nan
    return {
        "epoch": result.epoch + 1,
        "holdout_map": float(result.holdout_map),
        "holdout_map_model": float(result.holdout.map),
        "holdout_map_ema": float(ema_map),
        "best_holdout_map": float(result.best_map),
        "train_loss": float(train["loss"]),
        "lr": float(train["lr"]),
        "train_images": images,
        "images_per_s": images / seconds if seconds > 0 else math.nan,
        "steady_images_per_s": steady_sum if steady_sum > 0 else math.nan,
        "epoch_seconds": seconds,
        "mlflow_run_id": run_id,
    }


def _write_checkpoint(
    folder: Path, engine_state: dict, best: dict, splits, metrics: dict, cfg: Config, save
) -> None:
    """Rank 0: engine state, best weights and meta into ``folder`` (reported to Ray right after)."""
    save(engine_state, folder / ENGINE_FILE)
    best_file = {
        **best,
        "label_names": list(splits.label_names),
        "image_size": cfg.data.image_size,
        "config": cfg.to_yaml(),
    }
    save(best_file, folder / BEST_FILE)
    meta = {
        "mlflow_run_id": metrics["mlflow_run_id"],
        "epoch": metrics["epoch"],
        "holdout_map": metrics["holdout_map"],
        "label_names": list(splits.label_names),
        "data_fingerprint": splits.fingerprint,
    }
    (folder / META_FILE).write_text(json.dumps(meta))


def _progress_line(cfg: Config, result, metrics: dict, walls: list[float]) -> None:
    epochs = cfg.train.epochs
    step = result.epoch + 1
    eta = 0.0 if result.stop else sum(walls) / len(walls) * (epochs - step)
    ema = f", ema {metrics['holdout_map_ema']:.2f}" if not math.isnan(metrics["holdout_map_ema"]) else ""
    _say(
        f"epoch {step}/{epochs}  loss {metrics['train_loss']:.4f}  holdout mAP {metrics['holdout_map']:.2f}"
        f" (model {metrics['holdout_map_model']:.2f}{ema}; best {metrics['best_holdout_map']:.2f})"
        f"  {metrics['images_per_s']:.1f} img/s  epoch {_duration(walls[-1])}  ETA {_duration(eta)}"
        + ("  early stop" if result.stop else "")
    )


def _log_attention(recorder, model, splits, out_dir: Path, count: int = 4) -> None:
    """Rank 0: attention figures of the first test images, logged under ``attention/``."""
    import torch

    from q2l.explain import log_attention_examples

    items = [splits.test[i] for i in range(min(count, len(splits.test)))]
    items = [it for it in items if it is not None]  # on_bad_image=skip gives None for a bad image
    if not items:
        return
    images = torch.stack([it[0] for it in items])
    names = [f"test_{int(it[2]):05d}" for it in items]
    for path in log_attention_examples(model, images, list(splits.label_names), out_dir, names=names):
        recorder.log_artifact(path, "attention")


def _finish(cfg, engine, splits, best, loader_kw, recorder, run_id, last_metrics, meta) -> dict[str, Any]:
    """All ranks: test-split evaluation of the best weights; rank 0 logs metrics, artifacts and the model."""
    import torch

    from q2l.data import build_loader
    from q2l.metrics import summarize

    if best is not None:
        engine.model.load_state_dict(best["model"])
    test_loader = build_loader(splits.test, cfg.data, cfg.train.batch_size, train=False, **loader_kw)
    preds = engine.predict(test_loader)
    summary = summarize(preds.scores, preds.targets)
    step = engine.epoch
    final = {
        **last_metrics,
        "epoch": step,
        "mlflow_run_id": run_id,
        "best_holdout_map": float(engine.best_map),
        "holdout_map": float(last_metrics.get("holdout_map", meta.get("holdout_map", math.nan))),
        "test_map": float(summary.map),
        "test_cf1": float(summary.cf1),
        "test_of1": float(summary.of1),
    }
    if recorder is not None:
        from q2l.record import log_evaluation

        with tempfile.TemporaryDirectory(prefix="q2l-eval-") as tmp:
            log_evaluation(
                recorder, tmp, "test", preds.scores, preds.targets, summary, splits.label_names, step
            )
            best_path = Path(tmp) / BEST_FILE
            torch.save(
                {
                    **(best or {"model": _state_on_cpu(engine.model), "source": "model", "epoch": step}),
                    "label_names": list(splits.label_names),
                    "image_size": cfg.data.image_size,
                    "config": cfg.to_yaml(),
                },
                best_path,
            )
            recorder.log_artifact(best_path, "checkpoints")
            _log_attention(recorder, engine.model, splits, Path(tmp) / "attention")
        recorder.set_tags(
            {
                "q2l.best_epoch": best["epoch"] if best else step,
                "q2l.best_source": best["source"] if best else "model",
            }
        )
        if cfg.mlflow.log_model and not recorder.has_model("model"):
            from q2l.packaging import log_model

            log_model(engine.model, label_names=list(splits.label_names), image_size=cfg.data.image_size)
        _say(f"test mAP {summary.map:.2f} (CF1 {summary.cf1:.2f}, OF1 {summary.of1:.2f}) of the best weights")
    return final
