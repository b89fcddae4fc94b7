"""A sweep: a Ray Tune experiment whose trials are Ray Train runs (docs/design.md §7).

Each trial runs ``run_trial`` (``q2l/sweep/trial.py``): the base config with the sampled values, built into a
``TorchTrainer`` by the train layer with ``TuneReportCallback`` and fitted, so every epoch's report reaches
Tune. The searcher and scheduler are in ``search.py``, the resource plan in ``resources.py``, the state
folder in ``storage.py``, the MLflow record and leaderboard in ``record.py``.

``--resume`` restores the Tune experiment: finished trials are kept, interrupted ones continue from their last
checkpoint in the same MLflow run, and the sweep continues the same parent run.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from q2l import tracking
from q2l.config import Config, ConfigError, config_from_dict
from q2l.progress import get_logger
from q2l.ray_runtime import alive_nodes, ray_session
from q2l.sweep import record as sweep_record
from q2l.sweep.recorded_storage import recording, recording_filesystem
from q2l.sweep.resources import ResourcePlan, plan_resources
from q2l.sweep.results import trial_rows, unfinished
from q2l.sweep.search import scheduler, search_algorithm, settings
from q2l.sweep.space import SearchSpace, parse_space
from q2l.sweep.state_integrity import Manifest, StateRecorder, SweepStateError, verify_state
from q2l.sweep.storage import (
    STATE_FILE,
    check_job_paths,
    read_state,
    resolve_sweep,
    storage_root,
    write_state,
)
from q2l.sweep.study import check_new_study
from q2l.sweep.trial import run_trial, trial_name

log = get_logger()


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


@dataclass
class _Sweep:
    """A sweep in progress: its config, space, name, state folder and saved state."""

    cfg: Config
    space: SearchSpace
    name: str
    path: str
    resume: bool
    started: float
    state: dict[str, Any] | None = None
    plan: ResourcePlan | None = None
    manifest: Manifest | None = None  # the verified digests of the Tune state (state_integrity.py)

    @property
    def parent(self) -> str:
        return self.state["parent_run_id"]

    def add_wall_time(self) -> None:
        self.state["wall_seconds"] += time.monotonic() - self.started
        self.started = time.monotonic()
        write_state(self.path, self.state)


def run_sweep(cfg: Config, resume: bool = False) -> SweepOutcome:
    """Run (or ``resume``) the sweep of ``cfg``; print and record the leaderboard; register the challenger.

    Raises ``ConfigError`` for a bad search space, sweep name or resource plan before any trial starts,
    ``TrackingUnavailableError`` when MLflow cannot be reached, and ``KeyboardInterrupt`` when the sweep was
    interrupted (its state is saved: ``--resume`` continues it).
    """
    sweep = _prepare(cfg, resume)
    started = sweep.started
    with ray_session(dashboard=True) as local:
        _plan(sweep, local)
        _open_parent(sweep)
        grid = _fit(sweep)
        left = unfinished(sweep.path, sweep.cfg.tune.num_samples)
        if left:
            sweep_record.set_parent_status(sweep.cfg, sweep.parent, "KILLED")
            log.info(
                f"sweep {sweep.name} interrupted with {left} trial(s) unfinished; continue it with --resume"
            )
            raise KeyboardInterrupt(f"sweep {sweep.name} interrupted")
    session_s = time.monotonic() - started
    rows = trial_rows(grid, sweep.cfg, sweep.space)
    summary = _record(sweep, rows)
    _print_summary(sweep, summary)
    ui = tracking.ui_command(sweep.cfg)
    log.info(f"see the sweep: {ui}")
    return SweepOutcome(sweep.name, sweep.path, sweep.parent, rows, summary, session_s, ui)


def _prepare(cfg: Config, resume: bool) -> _Sweep:
    """Validate everything that can be checked before Ray starts; read the saved state on ``--resume``."""
    from q2l.train import resolve_paths

    started = time.monotonic()
    space = parse_space(cfg)
    scheduler(cfg)  # validates grace_period against epochs
    check_job_paths(cfg)
    cfg = resolve_paths(cfg)
    name, path = resolve_sweep(cfg, resume)
    if not resume:
        check_new_study(cfg, space, name)  # the study name is free; tune.warm_start fits the space
    tracking.check_reachable(cfg)
    sweep = _Sweep(cfg, space, name, path, resume, started)
    if resume:
        sweep.state = read_state(path)
        _check_same_config(sweep)
        # before Ray starts: nothing from the sweep folder is unpickled unless its digests match
        sweep.manifest = verify_state(cfg, name, path, sweep.state.get("parent_run_id"))
    return sweep


def _check_same_config(sweep: _Sweep) -> None:
    stored = config_from_dict(sweep.state["config"], f"{sweep.path}/{STATE_FILE}").flat()
    differ = [k for k, v in sweep.cfg.flat().items() if k != "tune.name" and stored.get(k) != v]
    if differ:
        raise ConfigError(
            f"--resume: the config differs from the one sweep {sweep.name} started with in "
            f"{', '.join(differ)}; resume with the same config (stored in {sweep.path}/{STATE_FILE})"
        )


def _plan(sweep: _Sweep, local: bool) -> None:
    cfg = sweep.cfg
    sweep.plan = plan = plan_resources(cfg, alive_nodes())
    where = "a local Ray" if local else "the Ray cluster"
    log.info(
        f"sweep {sweep.name}: {cfg.tune.num_samples} trials on {where}, up to {plan.max_concurrent} at once "
        f"({cfg.ray.num_workers} worker(s) × {plan.per_worker} each); state in {sweep.path}"
    )
    if plan.note:
        log.info(plan.note)


def _open_parent(sweep: _Sweep) -> None:
    """Create the MLflow parent run and the state file, or mark the resumed parent RUNNING again."""
    cfg = sweep.cfg
    if sweep.state is None:
        parent = sweep_record.open_parent_run(
            cfg, sweep.space, sweep_name=sweep.name, sweep_path=sweep.path, settings=settings(cfg, sweep.plan)
        )
        sweep.state = {
            "name": sweep.name,
            "parent_run_id": parent,
            "config": cfg.to_dict(),
            "wall_seconds": 0.0,
        }
        write_state(sweep.path, sweep.state)
    else:
        sweep_record.set_parent_status(cfg, sweep.parent, "RUNNING")
    log.info(f"MLflow parent run {sweep.parent} ({tracking.ui_command(cfg)})")


def _tuner(sweep: _Sweep):
    """A new Tuner, or the saved one restored on ``--resume``."""
    from ray import tune

    cfg, plan = sweep.cfg, sweep.plan
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            base=cfg.to_dict(),
            space=sweep.space,
            sweep={"name": sweep.name, "path": sweep.path, "parent_run_id": sweep.parent},
        ),
        resources=plan.driver,
    )
    if sweep.resume:
        # again just before Tune reads the files: they may have changed since _prepare
        verify_state(cfg, sweep.name, sweep.path, sweep.parent)
        fs, path = recording_filesystem(sweep.path)
        return tune.Tuner.restore(
            path,
            storage_filesystem=fs,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=False,
        )
    fs, root = recording_filesystem(storage_root(cfg))  # Tune's state: recorded, then written
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=search_algorithm(cfg, sweep.space, sweep.name, plan.max_concurrent),
            scheduler=scheduler(cfg),
            num_samples=cfg.tune.num_samples,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
        ),
        run_config=tune.RunConfig(
            name=sweep.name,
            storage_path=root,
            storage_filesystem=fs,
            # a failing trial is recorded and the sweep goes on
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            verbose=1,
        ),
    )


def _fit(sweep: _Sweep):
    """Run the trials, Tune writing its state through the recording filesystem; on any interruption save the
    wall time and mark the parent run KILLED or FAILED."""
    recorder = StateRecorder(sweep.cfg, sweep.parent, sweep.manifest or Manifest(sweep.name, sweep.path))
    try:
        with recording(recorder):
            tuner = _tuner(sweep)  # a new Tuner writes tuner.pkl
            with _sigterm_as_sigint():
                grid = tuner.fit()
    except BaseException as e:
        sweep.add_wall_time()
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        sweep_record.set_parent_status(sweep.cfg, sweep.parent, status)
        raise
    sweep.add_wall_time()
    _check_unchanged(sweep)
    return grid


def _check_unchanged(sweep: _Sweep) -> None:
    """The state in storage is what the driver saved (the results are read from it next)."""
    try:
        verify_state(sweep.cfg, sweep.name, sweep.path, sweep.parent)
    except SweepStateError as e:
        sweep_record.set_parent_status(sweep.cfg, sweep.parent, "FAILED")
        raise SweepStateError(f"the sweep state changed in storage while the sweep ran: {e}") from None


def _record(sweep: _Sweep, rows: list[sweep_record.TrialRow]) -> sweep_record.SweepSummary:
    cfg, plan = sweep.cfg, sweep.plan
    cpus = plan.max_concurrent * cfg.ray.num_workers * cfg.ray.cpus_per_worker  # what the trials hold
    try:
        summary = sweep_record.record_sweep(
            cfg,
            rows,
            sweep.space,
            parent_run_id=sweep.parent,
            sweep_name=sweep.name,
            wall_seconds=sweep.state["wall_seconds"],
            cpus=cpus,
        )
    except BaseException:
        sweep_record.set_parent_status(cfg, sweep.parent, "FAILED")
        log.info(f"recording sweep {sweep.name} failed; --resume records it again without running any trial")
        raise
    sweep_record.set_parent_status(cfg, sweep.parent, "FINISHED")
    return summary


def _print_summary(sweep: _Sweep, summary: sweep_record.SweepSummary) -> None:
    cfg, plan = sweep.cfg, sweep.plan
    cpus = plan.max_concurrent * cfg.ray.num_workers * cfg.ray.cpus_per_worker
    log.info(f"sweep {sweep.name}: leaderboard (best held-out mAP; test mAP of the best weights)")
    sys.stdout.write(summary.leaderboard_text + "\n")
    saved = summary.epoch_budget - summary.epochs_run
    log.info(
        f"epochs run {summary.epochs_run} of {summary.epoch_budget} ({saved} saved by the scheduler); "
        f"wall time {sweep.state['wall_seconds'] / 60:.1f} min"
    )
    log.info(
        f"trained on {summary.train_images:,.0f} images: {summary.train_images_per_s_per_cpu:.1f} images/s "
        f"per CPU over the sweep's wall time ({cpus:g} CPUs held by {plan.max_concurrent} trial(s) at once)"
    )
    for note in summary.notes:
        log.info(f"note: {note}")
    if summary.registration:
        r = summary.registration
        log.info(
            f"registered {r.name} version {r.version} (trial {r.trial_id}) as @{sweep_record.CHALLENGER}"
        )


@contextmanager
def _sigterm_as_sigint() -> Iterator[None]:
    """``ray job stop`` sends SIGTERM: treat it as Ctrl-C so Tune saves its state and the sweep can resume."""
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
