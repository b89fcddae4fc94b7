"""What a sweep records in MLflow: parent run, trials' child runs, the leaderboard and plots, the challenger.

The sweep driver owns the parent run (created before the first trial; its id lives in the sweep folder so a
resumed sweep continues it). Each trial's child run is opened by the train layer (tag ``mlflow.parentRunId``)
and finished here: tagged with its trial id and status, FAILED with the error when the trial failed (created
here when the trial failed before the train layer opened one), FINISHED when ASHA stopped it. At the end the
parent run gets the leaderboard (CSV + markdown, ``leaderboard.py``), Optuna plots (``plots.py``), the best
trial and its config, and the best trial's logged model becomes a new version of ``mlflow.registered_model``
with alias ``challenger``.

Nothing here imports Ray: ``results.py`` turns Tune's results into ``TrialRow`` objects first.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from q2l import tracking
from q2l.config import Config
from q2l.packaging import MODEL_NAME
from q2l.registry.aliases import CHALLENGER
from q2l.sweep.leaderboard import (
    COMPLETED,
    FAILED,
    STOPPED,
    TrialRow,
    fmt,
    format_csv,
    format_markdown,
    format_text,
    leaderboard,
    ranked,
)
from q2l.sweep.plots import write_plots
from q2l.tracking.run_record import ERROR_TAG
from q2l.tracking.store import (
    ensure_experiment,
    flat_params,
    log_new_params,
    log_tags,
    tracking_uri,
    version_tags,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from q2l.sweep.space import SearchSpace

TRIAL_TAG = "q2l.trial_id"
SWEEP_TAG = "q2l.sweep"
REGISTERED_VERSION_TAG = "q2l.registered_version"
_SEARCH_PAGE = 1000  # child runs fetched per search_runs call


@dataclass
class Registration:
    """The model version made from the best trial."""

    name: str
    version: str
    run_id: str
    trial_id: str


@dataclass
class SweepSummary:
    """What the sweep's record concluded."""

    leaderboard_text: str
    best: TrialRow | None
    registration: Registration | None
    epochs_run: int
    epoch_budget: int
    notes: list[str]
    train_images: float = 0.0
    train_images_per_s_per_cpu: float = math.nan


def registered_model_name(cfg: Config) -> str:
    """``mlflow.registered_model``, else ``q2l-<data set folder name>`` (e.g. ``q2l-demo``)."""
    if cfg.mlflow.registered_model:
        return cfg.mlflow.registered_model
    stem = Path(cfg.data.root.rstrip("/")).name or "data"
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-").lower() or "data"
    return f"q2l-{slug}"


# ------------------------------------------------------------------------------------------ parent run
def open_parent_run(
    cfg: Config, space: SearchSpace, *, sweep_name: str, sweep_path: str, settings: dict
) -> str:
    """Create the sweep's parent run: base config params, sweep settings, the search space; returns its id."""
    client = tracking.client(cfg)
    exp_id = ensure_experiment(cfg)
    tags = {
        **version_tags(),
        "q2l.kind": "sweep",
        SWEEP_TAG: sweep_name,
        "q2l.sweep_path": sweep_path,
        "mlflow.note.content": f"Sweep {sweep_name}: {cfg.tune.num_samples} trials of {settings['searcher']} "
        f"search with {settings['scheduler']} over {', '.join(space.keys)}.",
    }
    run_id = client.create_run(exp_id, run_name=sweep_name, tags=tags).info.run_id
    params = flat_params(cfg)
    params.update({f"sweep.{k}": str(v)[:500] for k, v in settings.items()})
    params.update({f"space.{k}": json.dumps(v)[:500] for k, v in space.describe().items()})
    log_new_params(client, run_id, params, existing={})
    client.log_text(run_id, cfg.to_yaml(), "sweep_config.yaml")
    client.log_text(run_id, yaml.safe_dump(space.describe(), sort_keys=False), "search_space.yaml")
    return run_id


def set_parent_status(cfg: Config, run_id: str, status: str) -> None:
    """RUNNING again on resume; KILLED when interrupted; FAILED on an error; FINISHED at the end."""
    client = tracking.client(cfg)
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    else:
        client.set_terminated(run_id, status)


# ------------------------------------------------------------------------------------------ child runs
def _child_runs(client: MlflowClient, exp_id: str, parent_run_id: str) -> dict[str, list]:
    """The parent's child runs by trial id, every page of them."""
    out: dict[str, list] = {}
    token = None
    while True:
        page = client.search_runs(
            [exp_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
            max_results=_SEARCH_PAGE,
            page_token=token,
        )
        for run in page:
            out.setdefault(run.data.tags.get(TRIAL_TAG, ""), []).append(run)
        token = page.token
        if not token:
            return out


def _create_child_run(client: MlflowClient, exp_id: str, row: TrialRow, parent_run_id: str, sweep_name: str):
    """The run of a trial that failed before the train layer opened one (e.g. an unknown backbone)."""
    tags = {"mlflow.parentRunId": parent_run_id, TRIAL_TAG: row.trial_id, SWEEP_TAG: sweep_name}
    run = client.create_run(exp_id, run_name=f"trial-{row.trial_id}", tags=tags)
    log_new_params(client, run.info.run_id, {k: str(v)[:500] for k, v in row.values.items()}, existing={})
    return run


def finish_child_runs(cfg: Config, rows: Sequence[TrialRow], parent_run_id: str, sweep_name: str) -> None:
    """Tag every trial's child run with its status; end it FINISHED/FAILED; create it for early failures.

    Fills ``row.run_id``. A trial restarted before its first checkpoint may have left an older run: it ends
    KILLED (the trial's reported run is the one that counts), as does a still-RUNNING run of a trial Tune lost
    with a killed driver (not in ``rows``). A constant number of MLflow calls per trial.
    """
    client = tracking.client(cfg)
    exp_id = ensure_experiment(cfg)
    by_trial = _child_runs(client, exp_id, parent_run_id)
    for row in rows:
        runs = by_trial.get(row.trial_id, [])
        chosen = next((r for r in runs if r.info.run_id == row.run_id), runs[0] if runs else None)
        for other in runs:
            if other is not chosen and other.info.status == "RUNNING":
                client.set_terminated(other.info.run_id, "KILLED")
        if chosen is None:
            chosen = _create_child_run(client, exp_id, row, parent_run_id, sweep_name)
        row.run_id = chosen.info.run_id
        tags = {
            TRIAL_TAG: row.trial_id,
            SWEEP_TAG: sweep_name,
            "q2l.trial_status": row.status,
            "q2l.stopped_by_asha": str(row.status == STOPPED).lower(),
            "q2l.epochs_run": row.epochs,
        }
        if row.error:
            tags[ERROR_TAG] = row.error
        log_tags(client, row.run_id, tags)
        status = chosen.info.status  # as searched (a run the train layer still held open reads RUNNING)
        wanted = {FAILED: "FAILED", STOPPED: "FINISHED", COMPLETED: "FINISHED"}[row.status]
        if status != wanted and (status == "RUNNING" or row.status == FAILED):
            client.set_terminated(row.run_id, wanted)
    known = {row.trial_id for row in rows}
    for trial_id, runs in by_trial.items():
        for run in runs:
            if trial_id not in known and run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, "KILLED")


# ------------------------------------------------------------------------------------------ registration
def best_with_model(cfg: Config, rows: Sequence[TrialRow]) -> tuple[TrialRow, Any] | None:
    """The best-ranked trial whose child run logged a model, with that LoggedModel (None if none did)."""
    client = tracking.client(cfg)
    exp_id = ensure_experiment(cfg)
    for row in ranked(rows):
        if row.status == FAILED or not row.run_id or not math.isfinite(row.holdout_map):
            continue
        found = client.search_logged_models(
            [exp_id], filter_string=f"source_run_id = '{row.run_id}' AND name = '{MODEL_NAME}'"
        )
        if found:
            return row, found[0]
    return None


def register_challenger(
    cfg: Config,
    row: TrialRow,
    logged_model: Any,
    *,
    parent_run_id: str,
    sweep_name: str,
    space_keys: Sequence[str],
) -> Registration:
    """A new version of the registered model from ``row``'s model: alias ``challenger``, tags, description."""
    import mlflow
    from mlflow.exceptions import MlflowException

    # the registry resolves the version's models:/ source through the global tracking URI
    mlflow.set_tracking_uri(tracking_uri(cfg))
    client = tracking.client(cfg)
    name = registered_model_name(cfg)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name, description=f"Query2Label multi-label classifier trained on {cfg.data.root}"
        )
    child_tags = client.get_run(row.run_id).data.tags
    tags = {
        "q2l.parent_run_id": parent_run_id,
        "q2l.sweep": sweep_name,
        "q2l.trial_id": row.trial_id,
        "q2l.holdout_map": f"{row.holdout_map:.4f}",
        "q2l.test_map": f"{row.test_map:.4f}",
        "q2l.data_fingerprint": child_tags.get("q2l.data_fingerprint", ""),
    }
    searched = ", ".join(f"{k}={fmt(v)}" for k, v in row.values.items() if k in space_keys)
    description = (
        f"Best trial {row.trial_id} of sweep {sweep_name} (parent run {parent_run_id}): held-out mAP "
        f"{row.holdout_map:.2f}, test mAP {fmt(row.test_map)} after {row.epochs} epochs; {searched}."
    )
    mv = client.create_model_version(
        name,
        source=logged_model.model_uri,
        run_id=row.run_id,
        tags=tags,
        description=description,
        model_id=logged_model.model_id,
    )
    client.set_registered_model_alias(name, CHALLENGER, mv.version)
    return Registration(name=name, version=str(mv.version), run_id=row.run_id, trial_id=row.trial_id)


def _registration(
    cfg: Config,
    client: MlflowClient,
    pick: tuple[TrialRow, Any],
    *,
    parent_run_id: str,
    sweep_name: str,
    space_keys: Sequence[str],
) -> tuple[Registration, dict[str, str]]:
    """Register the challenger once per parent run (a resumed, already recorded sweep reuses the version)."""
    row, logged_model = pick
    parent_tags = client.get_run(parent_run_id).data.tags
    if REGISTERED_VERSION_TAG in parent_tags:
        name, version = parent_tags["q2l.registered_model"], parent_tags[REGISTERED_VERSION_TAG]
        return Registration(name, version, row.run_id, row.trial_id), {}
    reg = register_challenger(
        cfg, row, logged_model, parent_run_id=parent_run_id, sweep_name=sweep_name, space_keys=space_keys
    )
    return reg, {"q2l.registered_model": reg.name, REGISTERED_VERSION_TAG: reg.version}


# ------------------------------------------------------------------------------------------ the whole record
def _log_leaderboard_and_plots(
    client: MlflowClient, parent_run_id: str, rows: Sequence[TrialRow], space_keys: Sequence[str], table
) -> list[str]:
    """The leaderboard (CSV, markdown) and the Optuna plots on the parent run; returns notes on the plots."""
    header, body = table
    with tempfile.TemporaryDirectory(prefix="q2l-sweep-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "leaderboard.csv").write_text(format_csv(header, body))
        (tmp_path / "leaderboard.md").write_text(format_markdown(header, body))
        for f in ("leaderboard.csv", "leaderboard.md"):
            client.log_artifact(parent_run_id, str(tmp_path / f))
        plots, notes = write_plots(rows, space_keys, tmp_path / "plots")
        for p in plots:
            client.log_artifact(parent_run_id, str(p), "plots")
    return notes


def _sweep_metrics(
    cfg: Config, rows: Sequence[TrialRow], wall_seconds: float, cpus: float
) -> dict[str, float]:
    """Trial counts, epochs run against the budget, the training rate over the sweep's wall time."""
    ran = [r for r in rows if r.status != FAILED]
    epochs_run = sum(r.epochs for r in ran)
    budget = cfg.train.epochs * len(ran)
    images = sum(r.train_images for r in rows)
    rate = images / wall_seconds if wall_seconds > 0 else math.nan
    return {
        "trials_completed": sum(r.status == COMPLETED for r in rows),
        "trials_stopped": sum(r.status == STOPPED for r in rows),
        "trials_failed": sum(r.status == FAILED for r in rows),
        "epochs_run": epochs_run,
        "epoch_budget": budget,
        "epochs_saved": budget - epochs_run,
        "wall_seconds": wall_seconds,
        "train_images": images,
        "train_images_per_s": rate,
        "train_images_per_s_per_cpu": rate / cpus if cpus else math.nan,
    }


def _log_best(client: MlflowClient, parent_run_id: str, best: TrialRow, space_keys: Sequence[str]) -> dict:
    """The best trial's config on the parent run; returns its metrics and tags for the parent run."""
    best_cfg = {k: v for k, v in best.values.items() if k in space_keys}
    client.log_text(parent_run_id, yaml.safe_dump(best_cfg, sort_keys=False), "best_config.yaml")
    metrics = {"best_holdout_map": best.holdout_map, "best_test_map": best.test_map}
    return {"metrics": metrics, "tags": {"q2l.best_trial": best.trial_id, "q2l.best_run_id": best.run_id}}


def _log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])


def record_sweep(
    cfg: Config,
    rows: Sequence[TrialRow],
    space: SearchSpace,
    *,
    parent_run_id: str,
    sweep_name: str,
    wall_seconds: float,
    cpus: float,
) -> SweepSummary:
    """Finish the child runs and record the sweep's outcome on the parent run; register the challenger.

    ``cpus`` is what the sweep's concurrent trials held; the sweep's training rate is also given per CPU.
    Idempotent for a resumed sweep that had already finished: the challenger is registered once per parent.
    """
    client = tracking.client(cfg)
    finish_child_runs(cfg, rows, parent_run_id, sweep_name)
    table = leaderboard(rows, space.keys)
    notes = _log_leaderboard_and_plots(client, parent_run_id, rows, space.keys, table)
    metrics = _sweep_metrics(cfg, rows, wall_seconds, cpus)
    pick = best_with_model(cfg, rows)
    tags: dict[str, Any] = {}
    registration = None
    if pick is None:
        notes.append("no trial logged a model: nothing registered")
    else:
        best = _log_best(client, parent_run_id, pick[0], space.keys)
        metrics.update(best["metrics"])
        tags.update(best["tags"])
    _log_metrics(client, parent_run_id, metrics)
    if pick is not None:
        registration, registered = _registration(
            cfg, client, pick, parent_run_id=parent_run_id, sweep_name=sweep_name, space_keys=space.keys
        )
        tags.update(registered)
    if notes:
        tags["q2l.notes"] = "; ".join(notes)
    log_tags(client, parent_run_id, tags)
    return SweepSummary(
        format_text(*table),
        pick[0] if pick else None,
        registration,
        int(metrics["epochs_run"]),
        int(metrics["epoch_budget"]),
        notes,
        train_images=metrics["train_images"],
        train_images_per_s_per_cpu=metrics["train_images_per_s_per_cpu"],
    )
