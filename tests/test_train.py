"""The train layer on a real local Ray: DDP over gloo, the MLflow record, resume, worker death, divergence.

All runs use the tiny demo set and a small resnet18 at 32 px (``mlflow_tmp_config``); one Ray is shared.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from q2l import tracking
from q2l.record import ERROR_TAG
from q2l.train import FAULT_ENV, TrainingRunError, run_training

pytestmark = pytest.mark.slow


def _client(cfg):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking.tracking_uri(cfg))


def _runs(cfg):
    client = _client(cfg)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def _steps(client, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def _checkpoints(outcome_or_dir) -> list[dict]:
    """meta.json of every checkpoint Ray kept for a run, oldest first."""
    folder = Path(outcome_or_dir)
    dirs = sorted(d for d in folder.glob("checkpoint_*") if d.is_dir())
    return [json.loads((d / "meta.json").read_text()) for d in dirs]


def test_two_worker_ddp_run_is_recorded(ray_local, mlflow_tmp_config, tiny_demo_root, capfd):
    import mlflow
    import pandas as pd

    from q2l.packaging import load_predictor

    cfg = mlflow_tmp_config
    outcome = run_training(cfg)

    runs = _runs(cfg)
    assert len(runs) == 1
    run = runs[0]
    client = _client(cfg)
    assert run.info.run_id == outcome.run_id and run.info.status == "FINISHED"
    assert run.info.run_name == outcome.run_name
    p, t = run.data.params, run.data.tags
    assert p["model.backbone"] == "resnet18" and p["ray.num_workers"] == "2" and p["train.epochs"] == "2"
    assert t["q2l.num_workers"] == "2" and t["q2l.worker_kind"] == "cpu"
    assert len(t["q2l.data_fingerprint"]) == 16 and t["q2l.version.ray"] and t["q2l.version.timm"]
    for key in ("train_loss", "lr", "holdout_map", "holdout_map_model", "holdout_map_ema", "holdout_cf1",
                "holdout_of1", "images_per_s", "epoch_seconds"):  # fmt: skip
        assert _steps(client, outcome.run_id, key) == [1, 2], key
    assert _steps(client, outcome.run_id, "test_map") == [2]
    assert run.data.metrics["test_map"] == pytest.approx(outcome.test_map)
    history = client.get_metric_history(outcome.run_id, "holdout_map")
    assert outcome.best_holdout_map == pytest.approx(max(m.value for m in history))

    artifacts = {
        a.path for d in (None, "evaluation", "checkpoints") for a in client.list_artifacts(outcome.run_id, d)
    }
    for name in ("config.yaml", "evaluation/test_per_class_ap.csv", "evaluation/test_per_class_ap.png",
                 "evaluation/test_pr_curves.png", "checkpoints/best.pt"):  # fmt: skip
        assert name in artifacts, name
    assert len(client.list_artifacts(outcome.run_id, "attention")) >= 1
    logged = client.download_artifacts(outcome.run_id, "config.yaml")
    assert "backbone: resnet18" in Path(logged).read_text()

    # the packaged model predicts from raw image files, for any batch size
    images = sorted((tiny_demo_root / "val2014").glob("*.jpg"))[:3]
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking.tracking_uri(cfg))
    try:
        pyfunc = mlflow.pyfunc.load_model(f"runs:/{outcome.run_id}/model")
        probs = pyfunc.predict(pd.DataFrame({"image": [str(p) for p in images]}))
    finally:
        mlflow.set_tracking_uri(previous)
    assert probs.shape == (3, 10) and ((probs.values >= 0) & (probs.values <= 1)).all()
    # and so does the best-weights file of the Ray checkpoint
    predictor = load_predictor(outcome.checkpoint_path)
    one, failures = predictor.predict_paths([images[0]], batch_size=1)
    assert one.shape == (1, 10) and not failures

    # Ray kept the best k by holdout mAP plus the latest; every checkpoint knows its MLflow run
    metas = _checkpoints(Path(outcome.storage_path) / outcome.run_name)
    assert 1 <= len(metas) <= cfg.ray.keep_checkpoints + 1
    assert {m["mlflow_run_id"] for m in metas} == {outcome.run_id}
    assert "final" in metas[-1]

    out = capfd.readouterr().out
    assert "epoch 2/2" in out and "ETA" in out and "img/s" in out
    assert f"mlflow ui --backend-store-uri {tracking.tracking_uri(cfg)} --host 127.0.0.1" in out


def test_rerunning_the_command_resumes_the_same_run(ray_local, mlflow_tmp_config, tmp_path, monkeypatch):
    cfg = mlflow_tmp_config.replace({"ray.num_workers": 1, "ray.max_failures": 0})
    marker = tmp_path / "killed"
    monkeypatch.setenv(FAULT_ENV, f"kill:0:2:{marker}")  # the only worker dies halfway through epoch 2
    with pytest.raises(TrainingRunError, match="failed"):
        run_training(cfg)
    assert marker.exists()
    (interrupted,) = _runs(cfg)
    client = _client(cfg)
    assert interrupted.info.status == "FAILED" and interrupted.data.tags[ERROR_TAG]
    assert _steps(client, interrupted.info.run_id, "train_loss") == [1]

    outcome = run_training(cfg)  # the same command again: resumes after epoch 1
    assert outcome.run_id == interrupted.info.run_id
    (run,) = _runs(cfg)
    assert run.info.status == "FINISHED" and ERROR_TAG not in run.data.tags
    for key in ("train_loss", "holdout_map", "lr"):
        assert _steps(client, run.info.run_id, key) == [1, 2], key

    again = run_training(cfg)  # finished: nothing is trained or logged again
    assert again.run_id == outcome.run_id and again.test_map == pytest.approx(outcome.test_map)
    assert _steps(client, run.info.run_id, "train_loss") == [1, 2]
    assert _steps(client, run.info.run_id, "test_map") == [2]
    exp_id = run.info.experiment_id
    models = client.search_logged_models([exp_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    assert len(models) == 1


def test_killed_worker_resumes_from_last_checkpoint(
    ray_local, mlflow_tmp_config, tmp_path, monkeypatch, capfd
):
    cfg = mlflow_tmp_config.replace({"mlflow.log_model": False})  # 2 workers, max_failures 1
    marker = tmp_path / "killed"
    monkeypatch.setenv(FAULT_ENV, f"kill:1:2:{marker}")  # rank 1 is SIGKILLed halfway through epoch 2
    outcome = run_training(cfg)
    assert marker.exists()
    (run,) = _runs(cfg)
    assert run.info.run_id == outcome.run_id and run.info.status == "FINISHED"
    client = _client(cfg)
    for key in ("train_loss", "holdout_map", "images_per_s"):
        assert _steps(client, run.info.run_id, key) == [1, 2], key
    assert outcome.test_map == pytest.approx(run.data.metrics["test_map"])
    out = capfd.readouterr().out
    assert "resuming after epoch 1" in out  # restarted from the epoch-1 checkpoint, not from scratch


def test_non_finite_loss_fails_the_run_at_once_and_keeps_checkpoints(
    ray_local, mlflow_tmp_config, monkeypatch, capfd
):
    # 2 DDP workers (4 steps an epoch), restarts allowed: a divergence is deterministic, so no restart
    cfg = mlflow_tmp_config.replace({"ray.num_workers": 2, "ray.max_failures": 2, "train.batch_size": 4})
    monkeypatch.setenv(FAULT_ENV, "nan:2")  # weights become NaN halfway through epoch 2
    with pytest.raises(TrainingRunError, match=r"non-finite loss nan at epoch 1, step \d+"):
        run_training(cfg)
    assert "resuming after epoch" not in capfd.readouterr().out
    (run,) = _runs(cfg)
    assert run.info.status == "FAILED"
    assert "non-finite loss" in run.data.tags[ERROR_TAG]
    assert _steps(_client(cfg), run.info.run_id, "train_loss") == [1]
    (ray_dir,) = [d for d in Path(cfg.ray.storage_path).iterdir() if d.is_dir()]
    metas = _checkpoints(ray_dir)
    assert [m["epoch"] for m in metas] == [1] and metas[0]["mlflow_run_id"] == run.info.run_id
