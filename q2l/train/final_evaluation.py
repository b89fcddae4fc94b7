"""After the last epoch: the best weights on the test split, and what rank 0 logs about them."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from q2l.packaging import MODEL_NAME, checkpoint
from q2l.progress import get_logger

if TYPE_CHECKING:
    from q2l.train.worker_run import WorkerRun

log = get_logger()
FINAL_METRIC = "test_map"  # only in a run's final report: the run trained to its end and was tested


def evaluate_best(run: WorkerRun, last_metrics: dict[str, Any]) -> dict[str, Any]:
    """All ranks: test-split evaluation of the best weights; rank 0 logs metrics, artifacts and the model.

    Returns the final report (the last epoch's metrics with ``test_map`` and friends).
    """
    from q2l.data import build_loader
    from q2l.metrics import summarize

    cfg, engine = run.cfg, run.engine
    engine.load_best_weights()
    test_loader = build_loader(run.splits.test, cfg.data, cfg.train.batch_size, train=False, **run.loader_kw)
    preds = engine.predict(test_loader)
    summary = summarize(preds.scores, preds.targets)
    final = {
        **last_metrics,
        "epoch": engine.epoch,
        "mlflow_run_id": run.run_id,
        "best_holdout_map": float(engine.best_map),
        "holdout_map": float(last_metrics.get("holdout_map", run.meta.get("holdout_map", math.nan))),
        FINAL_METRIC: float(summary.map),
        "test_cf1": float(summary.cf1),
        "test_of1": float(summary.of1),
    }
    if run.recorder is not None:
        _log_final(run, preds, summary)
        log.info(
            f"test mAP {summary.map:.2f} (CF1 {summary.cf1:.2f}, OF1 {summary.of1:.2f}) of the best weights"
        )
    return final


def _log_final(run: WorkerRun, preds, summary) -> None:
    """Rank 0: the packaged model, test metrics (linked to it and the test dataset), AP table and plots, the
    best weights and attention maps."""
    from q2l.tracking.run_record import log_evaluation

    cfg, engine, recorder, splits = run.cfg, run.engine, run.recorder, run.splits
    step = engine.epoch
    best = engine.best_weights or {"model": engine.model.state_dict(), "source": "model", "epoch": step}
    model_id = _packaged_model(run, best["epoch"]) if cfg.mlflow.log_model else None
    with tempfile.TemporaryDirectory(prefix="q2l-eval-") as tmp:
        log_evaluation(
            recorder, tmp, "test", preds.scores, preds.targets, summary, splits.label_names, step, model_id
        )
        content = checkpoint.best_file_content(best, splits.label_names, cfg.data.image_size, cfg.to_yaml())
        recorder.log_artifact(checkpoint.save_best(content, Path(tmp) / checkpoint.BEST_FILE), "checkpoints")
        _log_attention(run, Path(tmp) / "attention")
    recorder.set_tags({"q2l.best_epoch": best["epoch"], "q2l.best_source": best["source"]})


def _packaged_model(run: WorkerRun, best_epoch: int) -> str:
    """Rank 0: the id of the run's packaged model (the best weights, already loaded), logged unless a
    restarted final phase finds it; tagged with the epoch it comes from."""
    from q2l.tracking.checkpoint_models import EPOCH_TAG

    recorder = run.recorder
    found = recorder.find_models(MODEL_NAME)
    if found:
        model_id = found[-1].model_id
    else:
        from q2l.packaging import log_model

        splits, cfg = run.splits, run.cfg
        info = log_model(
            run.engine.model, label_names=list(splits.label_names), image_size=cfg.data.image_size
        )
        model_id = info.model_id
    recorder.client.set_logged_model_tags(model_id, {EPOCH_TAG: str(best_epoch)})
    return model_id


def _log_attention(run: WorkerRun, out_dir: Path, count: int = 4) -> None:
    """Rank 0: attention figures of the first test images, logged under ``attention/``."""
    import torch

    from q2l.explain import log_attention_examples

    test = run.splits.test
    items = [test[i] for i in range(min(count, len(test)))]
    items = [it for it in items if it is not None]  # on_bad_image=skip gives None for a bad image
    if not items:
        return
    images = torch.stack([it[0] for it in items])
    names = [f"test_{int(it[2]):05d}" for it in items]
    labels = list(run.splits.label_names)
    for path in log_attention_examples(run.engine.model, images, labels, out_dir, names=names):
        run.recorder.log_artifact(path, "attention")
