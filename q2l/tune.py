"""The tune layer: a sweep is a Ray Tune experiment whose trials are Ray Train runs (DESIGN §7).

Each trial runs ``_trial`` (a Tune function trainable): the base config with the sampled values, built into a
``TorchTrainer`` by the train layer with ``TuneReportCallback`` and fitted; every epoch's report reaches Tune.
The searcher is Optuna (TPE, or random sampling as the baseline; both seeded, same define-by-run space);
ASHA stops weak trials at its rungs (never at the last epoch, so a surviving trial always gets its test
evaluation and logged model).

Resources (the trap): a trial's driver holds its resources while its workers need theirs. Drivers ask for
no CPU: a ``trial_slot`` when the cluster defines that resource (an admin's cap on concurrent trials), else a
little ``memory``. ``max_concurrent_trials`` is at most the number of trials whose workers fit the cluster
at once, counted node by node, so queued trials never hold workers' CPUs or GPUs.

Layout: ``<ray.storage_path>/<sweep name>/`` holds Tune's state, ``q2l_sweep.json`` (the MLflow parent run
id, the resolved base config) and ``trials/trial-<id>/`` (each trial's Ray Train checkpoints). ``--resume``
restores the Tune experiment: finished trials are kept, interrupted ones continue from their last
checkpoint in the same MLflow run, and the sweep continues the same parent run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from q2l import sweep_record
from q2l.config import Config, ConfigError, config_from_dict
from q2l.search_space import SearchSpace, parse_space
from q2l.train import error_line

METRIC = "best_holdout_map"  # the best held-out mAP so far: what the logged (best-epoch) model achieves
TIME_ATTR = "epoch"  # 1-based count of finished epochs, reported every epoch by the train layer
STATE_FILE = "q2l_sweep.json"
TRIAL_SLOT = "trial_slot"
DRIVER_MEMORY = 256 * 1024**2  # bytes of Ray's logical "memory" resource per trial driver
# keys whose relative paths would resolve inside a Ray job's temporary copy of the working dir
_PATH_KEYS = ("data.root", "model.pretrained_path", "ray.storage_path")


@dataclass
class ResourcePlan:
    """How trials are placed: the driver's resources and how many trials run at once."""

    driver: dict[str, float]
    per_worker: dict[str, float]
    fits: int  # trials whose workers fit the cluster at once
    max_concurrent: int
    note: str | None = None  # why max_concurrent is lower than asked


@dataclass
class SweepOutcome:
    """What a finished sweep produced."""

    name: str
    path: str  # the Tune experiment folder (or URI)
    parent_run_id: str
    rows: list[sweep_record.TrialRow]
    summary: sweep_record.SweepSummary
    wall_seconds: float  # this session; the parent run's wall_seconds metric adds up all sessions
    mlflow_ui: str


# ------------------------------------------------------------------------------------------ resources
def worker_resources(cfg: Config) -> dict[str, float]:
    """What one Ray Train worker of ``cfg`` asks for (as the train layer's ScalingConfig does)."""
    need = {"CPU": cfg.ray.cpus_per_worker, **cfg.ray.resources_per_worker}
    if cfg.ray.use_gpu:
        need.setdefault("GPU", 1.0)
    return {k: float(v) for k, v in need.items() if v}


def plan_resources(cfg: Config, nodes: list[dict[str, float]]) -> ResourcePlan:
    """Driver resources and ``max_concurrent_trials`` for a cluster given as each alive node's resources.

    Raises ``ConfigError`` when not even one trial's workers fit.
    """
    per_worker = worker_resources(cfg)
    num_workers = cfg.ray.num_workers
    slots = 0  # worker bundles that fit, node by node (a bundle never spans nodes)
    for node in nodes:
        fit = [math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in per_worker.items()]
        slots += min(fit) if fit else num_workers * cfg.tune.num_samples
    fits = slots // num_workers
    total = {k: sum(n.get(k, 0.0) for n in nodes) for k in per_worker}
    if fits < 1:
        raise ConfigError(
            f"one trial needs ray.num_workers = {num_workers} workers × {per_worker}, but the cluster has "
            f"{total} (per node: {[{k: n.get(k, 0.0) for k in per_worker} for n in nodes]}): lower "
            f"ray.num_workers or ray.cpus_per_worker, or add nodes"
        )
    slot_total = sum(n.get(TRIAL_SLOT, 0.0) for n in nodes)
    if slot_total >= 1:
        driver = {"CPU": 0.0, TRIAL_SLOT: 1.0}
        fits = min(fits, int(slot_total))
    else:
        driver = {"CPU": 0.0, "memory": float(DRIVER_MEMORY)}
    asked = cfg.tune.max_concurrent_trials
    max_concurrent = min(fits, cfg.tune.num_samples, asked or fits)
    note = None
    if asked and asked > fits:
        note = (
            f"tune.max_concurrent_trials = {asked} lowered to {fits}: only {fits} trial(s) of "
            f"{num_workers} × {per_worker} fit the cluster at once"
        )
    return ResourcePlan(driver, per_worker, fits, max_concurrent, note)


# ------------------------------------------------------------------------------------------ storage
def storage_root(cfg: Config) -> str:
    """``ray.storage_path`` as an absolute local path or a URI."""
    path = cfg.ray.storage_path
    if "://" in path:
        return _join(path)
    return os.path.abspath(os.path.expanduser(path))


def _fs(uri: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri)


def _join(root: str, *parts: str) -> str:
    """``root/part/...``; a URI's query (``s3://b/p?endpoint_override=...``) stays at the end."""
    base, sep, query = root.partition("?")
    return "/".join([base.rstrip("/"), *parts]) + sep + query


def read_state(sweep_path: str) -> dict[str, Any] | None:
    """The sweep's ``q2l_sweep.json`` (None when there is none)."""
    import pyarrow.fs

    fs, path = _fs(_join(sweep_path, STATE_FILE))
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def write_state(sweep_path: str, state: dict[str, Any]) -> None:
    """Write ``q2l_sweep.json`` into the sweep folder."""
    fs, path = _fs(_join(sweep_path, STATE_FILE))
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(state, indent=2).encode())


def _default_prefix(cfg: Config) -> str:
    return f"sweep-{sweep_record.registered_model_name(cfg).removeprefix('q2l-')}"


def _latest_sweep(root: str, prefix: str) -> str | None:
    """The newest sweep folder under ``root`` whose name starts with ``prefix`` and that has a state file."""
    import pyarrow.fs

    fs, path = _fs(root)
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    except OSError:
        return None
    names = sorted(
        i.base_name
        for i in infos
        if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith(prefix)
    )
    for name in reversed(names):  # names end with a sortable timestamp
        if read_state(_join(root, name)) is not None:
            return name
    return None


def resolve_sweep(cfg: Config, resume: bool) -> tuple[str, str]:
    """(name, path) of the sweep: ``tune.name``, else a new timestamped name (the latest on ``--resume``)."""
    root = storage_root(cfg)
    name = cfg.tune.name
    if resume:
        name = name or _latest_sweep(root, _default_prefix(cfg) + "-")
        if not name or read_state(_join(root, name)) is None:
            what = f"named {cfg.tune.name!r}" if cfg.tune.name else f"named {_default_prefix(cfg)}-*"
            raise ConfigError(
                f"--resume: no sweep {what} under {root} (set tune.name to the sweep to resume)"
            )
        return name, _join(root, name)
    if name is None:
        name = f"{_default_prefix(cfg)}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if read_state(_join(root, name)) is not None:
        raise ConfigError(
            f"tune.name = {name!r}: a sweep of that name exists under {root}; pass --resume to continue it "
            f"or choose another name"
        )
    return name, _join(root, name)


def _check_job_paths(cfg: Config) -> None:
    """Inside a Ray job with a working dir, relative paths would point into the job's temporary copy."""
    job = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not job or "working_dir" not in json.loads(job).get("runtime_env", {}):
        return
    flat = cfg.flat()
    keys = list(_PATH_KEYS) + ([] if cfg.mlflow.tracking_uri else ["mlflow.results_dir"])
    for key in keys:
        value = flat[key]
        if isinstance(value, str) and "://" not in value and not os.path.isabs(os.path.expanduser(value)):
            raise ConfigError(
                f"{key} = {value!r} is relative, and this Ray job runs in a temporary copy of its working "
                f"dir: data and results would be looked for and left there. Pass absolute paths, e.g. "
                f"--set {key}=$PWD/{value} (experiments/jobs/submit_sweep.sh does)"
            )


# ------------------------------------------------------------------------------------------ Ray
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _ray_session() -> Iterator[bool]:
    """Join ``RAY_ADDRESS`` (or an initialised Ray), else start a local Ray for the sweep; yields "local?".

    A local Ray gets a dashboard on loopback and ``RAY_API_SERVER_ADDRESS`` pointing at it, inherited by
    every worker: Ray Train's placement-group cleaner asks that API whether a trial's train controller is
    alive. When ASHA stops a trial its controller dies with it, and only the cleaner frees the workers'
    CPUs; by default it auto-detects the API and fails (or asks a stranger) when the machine runs several
    Ray instances, and the next trials then wait forever for CPUs.
    """
    import ray

    from q2l.train import local_ray_env

    if ray.is_initialized():
        yield False
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
        try:
            yield False
        finally:
            ray.shutdown()
        return
    port = _free_port()
    env = {**local_ray_env(), "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        ray.init(
            address="local",
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            _node_ip_address="127.0.0.1",
            log_to_driver=True,
            logging_level=logging.WARNING,
        )
        try:
            yield True
        finally:
            ray.shutdown()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _alive_nodes() -> list[dict[str, float]]:
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


# ------------------------------------------------------------------------------------------ trials
class TrialSetupError(ValueError):
    """A trial's config cannot work (e.g. a backbone timm does not know); raised before workers start."""


def _trial(
    config: dict[str, Any], *, base: dict[str, Any], space: SearchSpace, sweep: dict[str, str]
) -> None:
    """One trial (in a Tune trial actor): the base config with the sampled values, fitted on Ray Train."""
    import timm
    from ray import tune
    from ray.train import TrainingFailedError
    from ray.tune.integration.ray_train import TuneReportCallback

    from q2l.train import build_trainer, recorded_failure, worker_error

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
        storage_path=_join(sweep["path"], "trials"),
        parent_run_id=sweep["parent_run_id"],
        extra_tags={sweep_record.TRIAL_TAG: trial_id, sweep_record.SWEEP_TAG: sweep["name"]},
        callbacks=[TuneReportCallback()],
    )
    try:
        result = trainer.fit()
    except TrainingFailedError as e:
        raise RuntimeError(f"trial {trial_id} failed: {worker_error(e)}") from None
    if "test_map" not in (result.metrics or {}):  # no final report: stopped by the scheduler, or diverged
        failure = recorded_failure(cfg, trainer.train_loop_config["launch_id"])
        if failure is not None:
            raise RuntimeError(f"trial {trial_id} failed: {failure[1]}")


def _trial_name(trial) -> str:
    return f"trial-{trial.trial_id}"


def _searcher(cfg: Config, space: SearchSpace):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    t = cfg.tune
    if t.searcher == "random":
        sampler = optuna.samplers.RandomSampler(seed=t.seed)
    else:
        # Optuna's default of 10 random start-up trials would make a small sweep pure random search
        startup = min(10, max(2, math.ceil(t.num_samples / 3)))
        sampler = optuna.samplers.TPESampler(seed=t.seed, n_startup_trials=startup)
    return OptunaSearch(space, metric=METRIC, mode="max", sampler=sampler)


def _scheduler(cfg: Config):
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


def _settings(cfg: Config, plan: ResourcePlan) -> dict[str, Any]:
    t = cfg.tune
    settings = {
        "searcher": "optuna-tpe" if t.searcher == "optuna" else "optuna-random",
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


# ------------------------------------------------------------------------------------------ results
def _trial_rows(grid, base: Config, space: SearchSpace) -> list[sweep_record.TrialRow]:
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
            status, error = sweep_record.FAILED, error_line(str(result.error))
        elif "test_map" in metrics:
            status, error = sweep_record.COMPLETED, None
        else:
            status, error = sweep_record.STOPPED, None
        rows.append(
            sweep_record.TrialRow(
                trial_id=trial_id,
                status=status,
                sampled=sampled,
                values=values,
                holdout_map=float(metrics.get(METRIC, math.nan)),
                test_map=float(metrics.get("test_map", math.nan)),
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


def _unfinished(sweep_path: str, num_samples: int) -> int:
    """Trials not run to an end (an interrupted sweep): never started, or neither terminated nor errored.

    Read from the state Tune saved: after an interrupt, Tune's in-memory trials all read TERMINATED.
    """
    from ray.tune import ExperimentAnalysis
    from ray.tune.experiment import Trial

    trials = ExperimentAnalysis(sweep_path).trials
    return num_samples - sum(t.status in (Trial.TERMINATED, Trial.ERROR) for t in trials)


# ------------------------------------------------------------------------------------------ the sweep
def _say(line: str) -> None:
    sys.stdout.write(f"[q2l] {line}\n")
    sys.stdout.flush()


@contextmanager
def _sigterm_as_sigint() -> Iterator[None]:
    """``ray job stop`` sends SIGTERM: treat it as Ctrl-C so Tune saves its state and the sweep can resume."""
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_sweep(cfg: Config, resume: bool = False) -> SweepOutcome:
    """Run (or ``resume``) the sweep of ``cfg``; print and record the leaderboard; register the challenger.

    Raises ``ConfigError`` for a bad search space, sweep name or resource plan before any trial starts,
    ``TrackingUnavailableError`` when MLflow cannot be reached, and ``KeyboardInterrupt`` when the sweep was
    interrupted (its state is saved: ``--resume`` continues it).
    """
    from ray import tune

    from q2l import tracking
    from q2l.train import resolve_paths

    started = time.monotonic()
    space = parse_space(cfg)
    _scheduler(cfg)  # validates grace_period against epochs before anything starts
    _check_job_paths(cfg)
    cfg = resolve_paths(cfg)
    name, path = resolve_sweep(cfg, resume)
    tracking.check_reachable(cfg)
    state = read_state(path) if resume else None
    if state is not None:
        stored = config_from_dict(state["config"], f"{path}/{STATE_FILE}").flat()
        differ = [k for k, v in cfg.flat().items() if k != "tune.name" and stored.get(k) != v]
        if differ:
            raise ConfigError(
                f"--resume: the config differs from the one sweep {name} started with in "
                f"{', '.join(differ)}; resume with the same config (stored in {path}/{STATE_FILE})"
            )

    with _ray_session() as local:
        plan = plan_resources(cfg, _alive_nodes())
        cpus = plan.max_concurrent * cfg.ray.num_workers * cfg.ray.cpus_per_worker  # what the trials hold
        where = "a local Ray" if local else "the Ray cluster"
        _say(
            f"sweep {name}: {cfg.tune.num_samples} trials on {where}, up to {plan.max_concurrent} at once "
            f"({cfg.ray.num_workers} worker(s) × {plan.per_worker} each); state in {path}"
        )
        if plan.note:
            _say(plan.note)
        if state is None:
            parent = sweep_record.open_parent_run(
                cfg, space, sweep_name=name, sweep_path=path, settings=_settings(cfg, plan)
            )
            state = {"name": name, "parent_run_id": parent, "config": cfg.to_dict(), "wall_seconds": 0.0}
            write_state(path, state)
        else:
            parent = state["parent_run_id"]
            sweep_record.set_parent_status(cfg, parent, "RUNNING")
        _say(f"MLflow parent run {parent} ({tracking.ui_command(cfg)})")

        trainable = tune.with_resources(
            tune.with_parameters(
                _trial,
                base=cfg.to_dict(),
                space=space,
                sweep={"name": name, "path": path, "parent_run_id": parent},
            ),
            resources=plan.driver,
        )
        try:
            if resume:
                tuner = tune.Tuner.restore(
                    path,
                    trainable=trainable,
                    resume_unfinished=True,
                    resume_errored=False,
                    restart_errored=False,
                )
            else:
                tuner = tune.Tuner(
                    trainable,
                    tune_config=tune.TuneConfig(
                        search_alg=_searcher(cfg, space),
                        scheduler=_scheduler(cfg),
                        num_samples=cfg.tune.num_samples,
                        max_concurrent_trials=plan.max_concurrent,
                        trial_name_creator=_trial_name,
                        trial_dirname_creator=_trial_name,
                    ),
                    run_config=tune.RunConfig(
                        name=name,
                        storage_path=storage_root(cfg),
                        # a failing trial is recorded and the sweep goes on
                        failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                        verbose=1,
                    ),
                )
            with _sigterm_as_sigint():
                grid = tuner.fit()
        except BaseException as e:
            state["wall_seconds"] += time.monotonic() - started
            write_state(path, state)
            sweep_record.set_parent_status(
                cfg, parent, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
            )
            raise
        session_s = time.monotonic() - started
        state["wall_seconds"] += session_s
        write_state(path, state)
        left = _unfinished(path, cfg.tune.num_samples)
        if left:
            sweep_record.set_parent_status(cfg, parent, "KILLED")
            _say(f"sweep {name} interrupted with {left} trial(s) unfinished; continue it with --resume")
            raise KeyboardInterrupt(f"sweep {name} interrupted")

    rows = _trial_rows(grid, cfg, space)
    try:
        summary = sweep_record.record_sweep(
            cfg,
            rows,
            space,
            parent_run_id=parent,
            sweep_name=name,
            wall_seconds=state["wall_seconds"],
            cpus=cpus,
        )
    except BaseException:
        sweep_record.set_parent_status(cfg, parent, "FAILED")
        _say(f"recording sweep {name} failed; --resume records it again without running any trial")
        raise
    sweep_record.set_parent_status(cfg, parent, "FINISHED")
    _say(f"sweep {name}: leaderboard (best held-out mAP; test mAP of the best weights)")
    sys.stdout.write(summary.leaderboard_text + "\n")
    saved = summary.epoch_budget - summary.epochs_run
    _say(
        f"epochs run {summary.epochs_run} of {summary.epoch_budget} ({saved} saved by the scheduler); "
        f"wall time {state['wall_seconds'] / 60:.1f} min"
    )
    _say(
        f"trained on {summary.train_images:,.0f} images: {summary.train_images_per_s_per_cpu:.1f} images/s "
        f"per CPU over the sweep's wall time ({cpus:g} CPUs held by {plan.max_concurrent} trial(s) at once)"
    )
    for note in summary.notes:
        _say(f"note: {note}")
    if summary.registration:
        r = summary.registration
        _say(f"registered {r.name} version {r.version} (trial {r.trial_id}) as @{sweep_record.CHALLENGER}")
    ui = tracking.ui_command(cfg)
    _say(f"see the sweep: {ui}")
    return SweepOutcome(name, path, parent, rows, summary, session_s, ui)
