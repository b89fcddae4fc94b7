"""What a sweep records in MLflow: parent run, trials' child runs, leaderboard, plots, the challenger.

The sweep driver owns the parent run (created before the first trial; its id lives in the sweep folder so a
resumed sweep continues it). Each trial's child run is opened by the train layer (tag ``mlflow.parentRunId``)
and finished here: tagged with its trial id and status, FAILED with the error when the trial failed (created
here when the trial failed before the train layer opened one), FINISHED when ASHA stopped it. At the end the
parent run gets the leaderboard (CSV + markdown), Optuna plots, the best trial and its config, and the best
trial's logged model becomes a new version of ``mlflow.registered_model`` with alias ``challenger``.

Nothing here imports Ray: the tune layer turns Tune's results into ``TrialRow`` objects first.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from q2l import tracking
from q2l.config import Config
from q2l.record import ERROR_TAG
from q2l.tracking import ensure_experiment, flat_params, tracking_uri, version_tags

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from q2l.search_space import SearchSpace

TRIAL_TAG = "q2l.trial_id"
SWEEP_TAG = "q2l.sweep"
CHALLENGER = "challenger"
MODEL_NAME = "model"  # the train layer logs the packaged model under this name
COMPLETED, STOPPED, FAILED = "completed", "stopped", "failed"
_TAG_MAX_CHARS = 5000
# leaderboard columns always shown (config key → header); other searched keys are appended
_FIXED_COLUMNS = {
    "model.backbone": "backbone",
    "model.hidden_dim": "width",
    "loss.gamma_neg": "gamma_neg",
    "loss.gamma_pos": "gamma_pos",
    "loss.clip": "clip",
    "optim.lr": "lr",
}


@dataclass
class TrialRow:
    """One trial's outcome, as the leaderboard and the MLflow record need it."""

    trial_id: str
    status: str  # completed | stopped (by the scheduler) | failed
    sampled: dict[str, Any]  # the searcher's config (Optuna parameter names)
    values: dict[str, Any]  # the resolved config, flat (section.key → value)
    holdout_map: float = math.nan  # best held-out mAP over the epochs it ran
    test_map: float = math.nan  # of the best weights; only trials that ran to the end have one
    epochs: int = 0
    history: list[float] = field(default_factory=list)  # held-out mAP of each epoch
    train_images: float = 0.0  # images trained on, all epochs and workers
    run_id: str | None = None  # the child MLflow run
    error: str | None = None
    order: int = 0  # creation order in the sweep (Optuna's trial number)


@dataclass
class Registration:
    """The model version made from the best trial."""

    name: str
    version: str
    run_id: str
    trial_id: str


def registered_model_name(cfg: Config) -> str:
    """``mlflow.registered_model``, else ``q2l-<data set folder name>`` (e.g. ``q2l-demo``)."""
    if cfg.mlflow.registered_model:
        return cfg.mlflow.registered_model
    stem = Path(cfg.data.root.rstrip("/")).name or "data"
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-").lower() or "data"
    return f"q2l-{slug}"


def _set_tags(client: MlflowClient, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(k, str(v)[:_TAG_MAX_CHARS]) for k, v in tags.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, tags=items[i : i + 100])


def _log_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    existing = client.get_run(run_id).data.params
    new = [Param(k, v) for k, v in params.items() if k not in existing]
    for i in range(0, len(new), 100):
        client.log_batch(run_id, params=new[i : i + 100])


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
    _log_params(client, run_id, params)
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
    runs = client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    out: dict[str, list] = {}
    for run in runs:
        out.setdefault(run.data.tags.get(TRIAL_TAG, ""), []).append(run)
    return out


def finish_child_runs(cfg: Config, rows: Sequence[TrialRow], parent_run_id: str, sweep_name: str) -> None:
    """Tag every trial's child run with its status; end it FINISHED/FAILED; create it for early failures.

    Fills ``row.run_id``. A trial restarted before its first checkpoint may have left an older run: it ends
    KILLED (the trial's reported run is the one that counts).
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
            # the trial failed before the train layer opened a run (e.g. a backbone that does not exist)
            tags = {"mlflow.parentRunId": parent_run_id, TRIAL_TAG: row.trial_id, SWEEP_TAG: sweep_name}
            chosen = client.create_run(exp_id, run_name=f"trial-{row.trial_id}", tags=tags)
            _log_params(client, chosen.info.run_id, {k: str(v)[:500] for k, v in row.values.items()})
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
        _set_tags(client, row.run_id, tags)
        status = client.get_run(row.run_id).info.status
        wanted = {FAILED: "FAILED", STOPPED: "FINISHED", COMPLETED: "FINISHED"}[row.status]
        if status != wanted and (status == "RUNNING" or row.status == FAILED):
            client.set_terminated(row.run_id, wanted)


# ------------------------------------------------------------------------------------------ leaderboard
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3g}" if abs(value) < 0.01 or abs(value) >= 1000 else f"{value:.4g}"
    return "-" if value is None else str(value)


def ranked(rows: Sequence[TrialRow]) -> list[TrialRow]:
    """Best held-out mAP first; failed trials last."""
    return sorted(
        rows, key=lambda r: (r.status == FAILED, -(r.holdout_map if math.isfinite(r.holdout_map) else -1e9))
    )


def leaderboard(rows: Sequence[TrialRow], space_keys: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """(header, rows of text) for the ranked trials: config columns, held-out/test mAP, epochs, status."""
    keys = list(_FIXED_COLUMNS) + [k for k in space_keys if k not in _FIXED_COLUMNS]
    header = ["rank", "trial"] + [_FIXED_COLUMNS.get(k, k) for k in keys]
    header += ["holdout_map", "test_map", "epochs", "status", "run_id"]
    body = []
    for i, r in enumerate(ranked(rows), 1):
        status = {STOPPED: "stopped by ASHA"}.get(r.status, r.status) + (f": {r.error}" if r.error else "")
        body.append(
            [str(i), r.trial_id]
            + [_fmt(r.values.get(k)) for k in keys]
            + [_fmt(r.holdout_map), _fmt(r.test_map), str(r.epochs), status, r.run_id or "-"]
        )
    return header, body


def format_text(header: list[str], body: list[list[str]], max_cell: int = 60) -> str:
    """A fixed-width table for the terminal (long cells such as errors are cut)."""
    cells = [[c if len(c) <= max_cell else c[: max_cell - 1] + "…" for c in row] for row in [header, *body]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(header: list[str], body: list[list[str]]) -> str:
    """The leaderboard as a markdown table."""

    def esc(c: str) -> str:
        return c.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def format_csv(header: list[str], body: list[list[str]]) -> str:
    """The leaderboard as CSV text."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(body)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ Optuna plots
def _plot_study(rows: Sequence[TrialRow], space_keys: Sequence[str]):
    """An Optuna study rebuilt from the trials, with one parameter per config key (conditional cases merged).

    Failed trials are FAIL; the others are COMPLETE with their best held-out mAP (as the searcher saw them:
    Ray's OptunaSearch reports a trial stopped by ASHA as complete with its last result).
    """
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    from optuna.trial import TrialState, create_trial

    ok = [r for r in rows if r.status != FAILED and math.isfinite(r.holdout_map)]
    dists = {}
    for key in space_keys:
        seen = [r.values.get(key) for r in ok]
        distinct = list(dict.fromkeys(seen))
        if len(distinct) < 2:
            continue  # fixed (or never varied): nothing to plot
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in distinct):
            lo, hi = min(distinct), max(distinct)
            if all(isinstance(v, int) for v in distinct):
                dists[key] = IntDistribution(lo, hi)
            else:
                dists[key] = FloatDistribution(lo, hi, log=lo > 0 and hi / lo >= 100)
        else:
            dists[key] = CategoricalDistribution([str(v) for v in distinct])
    study = optuna.create_study(direction="maximize", study_name="sweep")
    for r in sorted(rows, key=lambda r: r.order):
        if r in ok:
            params = {
                k: (str(r.values[k]) if isinstance(d, CategoricalDistribution) else r.values[k])
                for k, d in dists.items()
            }
            study.add_trial(
                create_trial(
                    params=params,
                    distributions=dists,
                    value=r.holdout_map,
                    intermediate_values=dict(enumerate(r.history, 1)),
                    state=TrialState.COMPLETE,
                )
            )
        else:
            # a failed trial's values may lie outside the ranges the finished trials span: no params
            study.add_trial(create_trial(state=TrialState.FAIL))
    return study


def write_plots(
    rows: Sequence[TrialRow], space_keys: Sequence[str], out_dir: Path
) -> tuple[list[Path], list[str]]:
    """Optimisation history, parameter importances, parallel coordinates, per-epoch curves as PNG files.

    Returns (files written, notes on plots that could not be drawn, e.g. too few trials).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.importance import PedAnovaImportanceEvaluator
    from optuna.visualization import matplotlib as vis

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _plot_study(rows, space_keys)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    plots: dict[str, Callable[[], Any]] = {
        "optimization_history": lambda: vis.plot_optimization_history(study, target_name="held-out mAP"),
        "intermediate_values": lambda: vis.plot_intermediate_values(study),
    }
    if len(complete) >= 2 and study.trials[0].distributions:
        # PED-ANOVA: Optuna's own estimator (the default fANOVA needs scikit-learn)
        plots["param_importances"] = lambda: vis.plot_param_importances(
            study, evaluator=PedAnovaImportanceEvaluator(), target_name="held-out mAP"
        )
        plots["parallel_coordinate"] = lambda: vis.plot_parallel_coordinate(study, target_name="held-out mAP")
    notes = (
        [] if "param_importances" in plots else ["parameter plots need 2+ finished trials with varied values"]
    )
    written = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, draw in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # optuna.visualization.matplotlib is "experimental"
                ax = draw()
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            path = out_dir / f"{name}.png"
            fig.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(fig)
            written.append(path)
        except Exception as e:  # noqa: BLE001 - one plot that cannot be drawn must not lose the sweep record
            notes.append(f"{name}: {type(e).__name__}: {e}")
    return written, notes


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
    searched = ", ".join(f"{k}={_fmt(v)}" for k, v in row.values.items() if k in space_keys)
    description = (
        f"Best trial {row.trial_id} of sweep {sweep_name} (parent run {parent_run_id}): held-out mAP "
        f"{row.holdout_map:.2f}, test mAP {_fmt(row.test_map)} after {row.epochs} epochs; {searched}."
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


# ------------------------------------------------------------------------------------------ the whole record
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
    header, body = leaderboard(rows, space.keys)
    text = format_text(header, body)
    epochs = cfg.train.epochs
    ran = [r for r in rows if r.status != FAILED]
    epochs_run = sum(r.epochs for r in ran)
    budget = epochs * len(ran)
    with tempfile.TemporaryDirectory(prefix="q2l-sweep-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "leaderboard.csv").write_text(format_csv(header, body))
        (tmp_path / "leaderboard.md").write_text(format_markdown(header, body))
        for f in ("leaderboard.csv", "leaderboard.md"):
            client.log_artifact(parent_run_id, str(tmp_path / f))
        plots, notes = write_plots(rows, space.keys, tmp_path / "plots")
        for p in plots:
            client.log_artifact(parent_run_id, str(p), "plots")
    best_pick = best_with_model(cfg, rows)
    best = best_pick[0] if best_pick else None
    metrics = {
        "trials_completed": sum(r.status == COMPLETED for r in rows),
        "trials_stopped": sum(r.status == STOPPED for r in rows),
        "trials_failed": sum(r.status == FAILED for r in rows),
        "epochs_run": epochs_run,
        "epoch_budget": budget,
        "epochs_saved": budget - epochs_run,
        "wall_seconds": wall_seconds,
        "train_images": sum(r.train_images for r in rows),
    }
    rate = metrics["train_images"] / wall_seconds if wall_seconds > 0 else math.nan
    metrics.update(
        {"train_images_per_s": rate, "train_images_per_s_per_cpu": rate / cpus if cpus else math.nan}
    )
    tags: dict[str, Any] = {}
    if best is not None:
        metrics.update({"best_holdout_map": best.holdout_map, "best_test_map": best.test_map})
        tags.update({"q2l.best_trial": best.trial_id, "q2l.best_run_id": best.run_id})
        best_cfg = {k: v for k, v in best.values.items() if k in space.keys}
        client.log_text(parent_run_id, yaml.safe_dump(best_cfg, sort_keys=False), "best_config.yaml")
    else:
        notes.append("no trial logged a model: nothing registered")
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(parent_run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    registration = None
    parent_tags = client.get_run(parent_run_id).data.tags
    if best_pick is not None and "q2l.registered_version" not in parent_tags:
        registration = register_challenger(
            cfg, best, best_pick[1], parent_run_id=parent_run_id, sweep_name=sweep_name, space_keys=space.keys
        )
        tags.update(
            {"q2l.registered_model": registration.name, "q2l.registered_version": registration.version}
        )
    elif best_pick is not None:
        registration = Registration(
            parent_tags["q2l.registered_model"],
            parent_tags["q2l.registered_version"],
            best.run_id,
            best.trial_id,
        )
    if notes:
        tags["q2l.notes"] = "; ".join(notes)
    _set_tags(client, parent_run_id, tags)
    return SweepSummary(
        text,
        best,
        registration,
        epochs_run,
        budget,
        notes,
        train_images=metrics["train_images"],
        train_images_per_s_per_cpu=metrics["train_images_per_s_per_cpu"],
    )
