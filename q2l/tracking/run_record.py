"""What a training run records in MLflow (rank 0 only): params, tags, per-epoch metrics, evaluation artifacts.

``RunRecorder`` owns one MLflow run for one Ray Train run: it opens a new run or continues the one whose id
the checkpoint carries (a restored run keeps one MLflow run), logs each epoch once with ``step=epoch``
(epochs already logged by an earlier attempt are skipped, so there are no gaps or duplicates), and ends the
run FINISHED or FAILED with the error. It also logs the data splits as dataset inputs
(``q2l/tracking/datasets.py``) and runs MLflow's system-metrics monitor while the run is open
(``q2l/tracking/system_metrics.py``); metrics can be linked to a logged model and a dataset (the epoch
checkpoints of ``q2l/tracking/checkpoint_models.py``, the packaged model's test metrics). The artifact
writers are plain functions (CSV, matplotlib Agg).
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from q2l.config import Config
from q2l.engine import EpochResult
from q2l.metrics import MetricSummary
from q2l.tracking.store import flat_params, log_new_params, log_tags, tracking_uri, version_tags

# held-out metrics logged per epoch, taken from whichever of model / EMA scored the higher mAP that epoch
HOLDOUT_KEYS = ("cp", "cr", "cf1", "op", "or", "of1", "cf1_top3", "of1_top3")
EPOCH_MARKER = "train_loss"  # logged with every epoch in one batch: its history says which epochs are in
LAUNCH_TAG = "q2l.launch_id"
ERROR_TAG = "q2l.error"


def _float_or_nan(x: float | None) -> float:
    return float(x) if x is not None else math.nan


def epoch_metrics(result: EpochResult) -> dict[str, float]:
    """The per-epoch MLflow metrics of an engine ``EpochResult`` (names shared with Ray's report)."""
    train = result.train
    model_map = result.holdout.map
    ema_map = result.holdout_ema.map if result.holdout_ema is not None else math.nan
    use_ema = result.holdout_ema is not None and not math.isnan(ema_map) and ema_map > model_map
    better = (result.holdout_ema if use_ema else result.holdout).as_dict()
    out = {
        "train_loss": float(train["loss"]),
        "lr": float(train["lr"]),
        "images_per_s": float(train["images_per_s"]),
        "steady_images_per_s": _float_or_nan(train.get("steady_images_per_s")),
        "epoch_seconds": float(train["seconds"]),
        "skipped_images": float(train.get("skipped_images", 0)),
        "holdout_map": float(result.holdout_map),
        "holdout_map_model": float(model_map),
        "holdout_map_ema": float(ema_map),
        "holdout_best_is_ema": 1.0 if use_ema else 0.0,
        "best_holdout_map": float(result.best_map),
    }
    out.update({f"holdout_{k}": better[k] for k in HOLDOUT_KEYS})
    return out


def best_and_worst(per_class_ap: torch.Tensor, k: int = 3) -> tuple[list[int], list[int]]:
    """Indices of the ``k`` classes with the highest and the lowest AP (classes without AP left out)."""
    ap = per_class_ap.double()
    valid = [i for i in range(len(ap)) if not math.isnan(ap[i].item())]
    ranked = sorted(valid, key=lambda i: ap[i].item(), reverse=True)
    k = min(k, len(ranked) // 2) if len(ranked) > 1 else len(ranked)
    return ranked[:k], ranked[::-1][:k]


def precision_recall_curve(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at every distinct score threshold of one class (unknown targets -1 ignored)."""
    keep = targets >= 0
    s, y = scores[keep].astype(np.float64), (targets[keep] > 0).astype(np.float64)
    if y.sum() == 0:
        raise ValueError("precision_recall_curve: the class has no positive example")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_tie = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # tied scores form one threshold
    tp = np.cumsum(y)[last_of_tie]
    predicted = last_of_tie + 1
    precision = np.r_[1.0, tp / predicted]
    recall = np.r_[0.0, tp / y.sum()]
    return precision, recall


def write_ap_table(
    path: str | Path, label_names: Sequence[str], summary: MetricSummary, targets: torch.Tensor
) -> Path:
    """CSV with one row per class: name, AP (0-100, empty when undefined), positives, rank by AP."""
    path = Path(path)
    ap = summary.per_class_ap.double()
    positives = (targets > 0).sum(0).tolist()
    order = sorted(range(len(ap)), key=lambda i: -ap[i].item() if not math.isnan(ap[i].item()) else math.inf)
    rank = {c: r + 1 for r, c in enumerate(order)}
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class_index", "class", "ap", "positives", "rank"])
        for i, name in enumerate(label_names):
            value = ap[i].item()
            w.writerow([i, name, "" if math.isnan(value) else f"{100 * value:.4f}", positives[i], rank[i]])
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on workers
    import matplotlib.pyplot as plt

    return plt


def plot_ap_bars(
    path: str | Path, label_names: Sequence[str], per_class_ap: torch.Tensor, title: str
) -> Path:
    """Horizontal bar chart of per-class AP, best at the top; classes without AP are left out."""
    plt = _pyplot()
    ap = per_class_ap.double()
    items = sorted(
        ((label_names[i], 100 * ap[i].item()) for i in range(len(ap)) if not math.isnan(ap[i].item())),
        key=lambda t: t[1],
    )
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.28 * len(items) + 1)))
    try:
        ax.barh([n for n, _ in items], [v for _, v in items], color="#4C72B0")
        mean = float(np.mean([v for _, v in items])) if items else math.nan
        ax.axvline(mean, color="#C44E52", linestyle="--", label=f"mAP {mean:.1f}")
        ax.set_xlim(0, 100)
        ax.set_xlabel("average precision (%)")
        ax.set_title(title)
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return Path(path)


def plot_pr_curves(
    path: str | Path,
    scores: torch.Tensor,
    targets: torch.Tensor,
    label_names: Sequence[str],
    best: Sequence[int],
    worst: Sequence[int],
    title: str,
) -> Path:
    """Precision-recall curves of the best (solid) and worst (dashed) classes by AP."""
    plt = _pyplot()
    s, t = scores.double().numpy(), targets.numpy()
    fig, ax = plt.subplots(figsize=(6.5, 5))
    try:
        for classes, style, group in ((best, "-", "best"), (worst, "--", "worst")):
            for c in classes:
                p, r = precision_recall_curve(s[:, c], t[:, c])
                ax.step(r, p, where="pre", linestyle=style, label=f"{group}: {label_names[c]}")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title(title)
        ax.legend(loc="lower left", fontsize="small")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return Path(path)


class RunRecorder:
    """One MLflow run for one training run, driven from rank 0 (see the module docstring)."""

    def __init__(self, cfg: Config):
        from q2l.tracking.store import activate, client

        self.cfg = cfg
        # inside the worker: the driver's global setting does not travel (log_model uses it)
        self.uri = activate(tracking_uri(cfg))
        self.client = client(cfg)
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.logged_steps: set[int] = set()
        self.datasets: dict[str, Any] = {}  # split → its MLflow dataset (q2l.tracking.datasets)
        self.monitor = None  # MLflow's system-metrics monitor while the run is open

    def open(
        self,
        experiment_id: str,
        *,
        run_id: str | None,
        run_name: str,
        launch_id: str,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """Continue ``run_id`` or the run an earlier attempt of this launch created, else create one.

        Makes it the active run (``q2l.packaging.log_model`` logs there), logs params, tags and the
        resolved config; returns the run id.
        """
        import mlflow

        if run_id is None:
            # an attempt of this same launch that died before its first checkpoint already made a run
            found = self.client.search_runs(
                [experiment_id], filter_string=f"tags.`{LAUNCH_TAG}` = '{launch_id}'", max_results=1
            )
            run_id = found[0].info.run_id if found else None
        all_tags = {**version_tags(), **(tags or {}), LAUNCH_TAG: launch_id}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        if run_id is None:
            run_id = self.client.create_run(experiment_id, run_name=run_name, tags=all_tags).info.run_id
        else:
            self.logged_steps = {m.step for m in self.client.get_metric_history(run_id, EPOCH_MARKER)}
            if ERROR_TAG in self._tags(run_id):
                self.client.delete_tag(run_id, ERROR_TAG)  # an earlier attempt failed; this one continues
            self._log_tags(run_id, all_tags)
        self.run_id, self.experiment_id = run_id, experiment_id
        mlflow.start_run(run_id=run_id)
        self._log_params(run_id)
        self.client.log_text(run_id, self.cfg.to_yaml(), "config.yaml")
        return run_id

    def _tags(self, run_id: str) -> dict[str, str]:
        return self.client.get_run(run_id).data.tags

    def _log_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        log_tags(self.client, run_id, tags)

    def _log_params(self, run_id: str) -> None:
        """Params once; on a continued run only new keys (MLflow params are immutable), changes as tags."""
        params = flat_params(self.cfg)
        existing = log_new_params(self.client, run_id, params)
        changed = {
            f"q2l.changed_param.{k}": v for k, v in params.items() if k in existing and existing[k] != v
        }
        if changed:
            self._log_tags(run_id, changed)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values as text)."""
        self._log_tags(self.run_id, {k: str(v) for k, v in tags.items()})

    def log_datasets(self, splits, root: str) -> None:
        """Log the run's train, holdout and test splits (a ``DataSplits``) as its dataset inputs."""
        from q2l.tracking.datasets import log_splits

        self.datasets = log_splits(self.client, self.run_id, splits, root)

    def start_system_metrics(self, node_id: str | None = None) -> None:
        """Start MLflow's system-metrics monitor for this run (stopped by ``finish`` / ``fail``)."""
        from q2l.tracking import system_metrics

        self.monitor = system_metrics.start(self.run_id, self.uri, node_id)

    def log_metrics(
        self,
        metrics: Mapping[str, float],
        step: int,
        *,
        linked: Mapping[str, float] | None = None,
        model_id: str | None = None,
        dataset: Any = None,
    ) -> bool:
        """Log ``metrics`` at ``step`` in one batch unless that step is already logged; True if logged.

        ``linked`` metrics go in the same batch, attached to logged model ``model_id`` and scored on
        ``dataset`` (an MLflow dataset: its name and digest), as the Models tab shows them.
        """
        if step in self.logged_steps:
            return False
        batch = metric_batch(metrics, step) + metric_batch(linked or {}, step, model_id, dataset)
        self.client.log_batch(self.run_id, metrics=batch)
        self.logged_steps.add(step)
        return True

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Upload one file into the run's artifacts."""
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def has_metric(self, key: str, step: int) -> bool:
        """True when ``key`` already has a value at ``step`` (a restarted final phase must not log twice)."""
        return any(m.step == step for m in self.client.get_metric_history(self.run_id, key))

    def find_models(self, name: str) -> list:
        """The logged models named ``name`` of this run (``LoggedModel`` s, oldest first)."""
        found = self.client.search_logged_models(
            [self.experiment_id], filter_string=f"source_run_id = '{self.run_id}' AND name = '{name}'"
        )
        return sorted(found, key=lambda m: m.creation_timestamp)

    def has_model(self, name: str) -> bool:
        """True when this run already logged a model ``name`` (a restarted final phase must not log twice)."""
        return len(self.find_models(name)) > 0

    def finish(self) -> None:
        """Stop the system metrics and end the run FINISHED."""
        import mlflow

        from q2l.tracking import system_metrics

        system_metrics.stop(self.monitor)
        self.monitor = None
        mlflow.end_run("FINISHED")

    def fail(self, error: BaseException) -> None:
        """End the run FAILED with the error text as tag ``q2l.error``; never raises (already failing)."""
        import mlflow

        from q2l.tracking import system_metrics

        system_metrics.stop(self.monitor)
        self.monitor = None
        try:
            if self.run_id is not None:
                self._log_tags(self.run_id, {ERROR_TAG: f"{type(error).__name__}: {error}"})
            mlflow.end_run("FAILED")
        except Exception:  # noqa: BLE001 - the original error matters more than a logging failure
            pass


def metric_batch(
    metrics: Mapping[str, float], step: int, model_id: str | None = None, dataset: Any = None
) -> list:
    """MLflow ``Metric`` s of ``metrics`` at ``step``, attached to ``model_id`` and ``dataset`` when given."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    where = {"dataset_name": dataset.name, "dataset_digest": dataset.digest} if dataset is not None else {}
    return [Metric(k, float(v), now, step, model_id=model_id, **where) for k, v in metrics.items()]


def log_evaluation(
    recorder: RunRecorder,
    workdir: str | Path,
    split: str,
    scores: torch.Tensor,
    targets: torch.Tensor,
    summary: MetricSummary,
    label_names: Sequence[str],
    step: int,
    model_id: str | None = None,
) -> None:
    """Metrics (``{split}_*`` at ``step``), per-class AP CSV + bar chart and PR curves of one split.

    The metrics are attached to logged model ``model_id`` (when given) and to the split's dataset input
    (when the recorder logged one).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if not recorder.has_metric(f"{split}_map", step):
        metrics = summary.as_dict(prefix=f"{split}_")
        batch = metric_batch(metrics, step, model_id, recorder.datasets.get(split))
        recorder.client.log_batch(recorder.run_id, metrics=batch)
    table = write_ap_table(workdir / f"{split}_per_class_ap.csv", label_names, summary, targets)
    bars = plot_ap_bars(
        workdir / f"{split}_per_class_ap.png",
        label_names,
        summary.per_class_ap,
        f"{split} per-class AP (mAP {summary.map:.1f}, {summary.num_samples} images)",
    )
    best, worst = best_and_worst(summary.per_class_ap)
    curves = plot_pr_curves(
        workdir / f"{split}_pr_curves.png",
        scores,
        targets,
        label_names,
        best,
        worst,
        f"{split}: precision-recall, best and worst classes",
    )
    for f in (table, bars, curves):
        recorder.log_artifact(f, "evaluation")
