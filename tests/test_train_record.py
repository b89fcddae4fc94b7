"""Tracking and record helpers without Ray: store location, reachability, run naming, the MLflow run lifecycle
(open / continue / no duplicate steps / FAILED) and the evaluation artifacts.

Fast: each test records into a copy of the session's migrated SQLite store (``mlflow_store``)."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from q2l import tracking
from q2l.config import load_config
from q2l.data import DataError
from q2l.engine import EpochResult
from q2l.metrics import average_precision, summarize
from q2l.tracking.run_record import (
    ERROR_TAG,
    RunRecorder,
    best_and_worst,
    epoch_metrics,
    plot_ap_bars,
    plot_pr_curves,
    precision_recall_curve,
    write_ap_table,
)
from q2l.train.driver import check_data_paths, default_run_name, resolve_paths


@pytest.fixture
def cfg(tmp_path, mlflow_store):
    """Defaults recording to the test's fresh, migrated SQLite store (``mlflow_store``)."""
    c = load_config(None, [f"mlflow.results_dir={tmp_path / 'results'}", "mlflow.experiment=unit"])
    assert tracking.tracking_uri(c) == mlflow_store
    return c


def test_default_store_is_sqlite_under_absolute_results_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = load_config(None, ["mlflow.results_dir=res"])
    uri = tracking.tracking_uri(c)
    assert uri == f"sqlite:///{tmp_path.resolve()}/res/mlflow/mlflow.db"
    assert tracking.artifact_location(c) == f"{tmp_path.resolve()}/res/mlflow/artifacts"
    assert tracking.ui_command(c) == f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1"
    server = c.replace({"mlflow.tracking_uri": "http://127.0.0.1:5000"})
    assert tracking.artifact_location(server) is None  # the server decides
    assert "http://127.0.0.1:5000" in tracking.ui_command(server)


def test_experiment_gets_explicit_artifact_location(cfg):
    from mlflow import MlflowClient

    exp_id = tracking.ensure_experiment(cfg)
    assert tracking.ensure_experiment(cfg) == exp_id  # idempotent
    exp = MlflowClient(tracking.tracking_uri(cfg)).get_experiment(exp_id)
    assert exp.artifact_location.endswith("/results/mlflow/artifacts")


def test_unreachable_server_is_reported_by_the_health_probe_with_its_uri(cfg):
    bad = cfg.replace({"mlflow.tracking_uri": "http://127.0.0.1:1"})
    # "is not reachable" is the /health probe's own error: MLflow's retrying client was never asked
    with pytest.raises(tracking.TrackingUnavailableError, match=r"http://127\.0\.0\.1:1 is not reachable"):
        tracking.check_reachable(bad)


def test_flat_params_are_bounded(cfg):
    long = cfg.replace({"tune.space": {f"optim.k{i}": {"choice": list(range(50))} for i in range(5)}})
    params = tracking.flat_params(long)
    assert len(params["tune.space"]) == tracking.PARAM_MAX_CHARS
    assert params["optim.lr"] == str(cfg.optim.lr)
    assert params["data.train_file"] == "None"


def test_run_name_is_stable_and_follows_what_defines_training(cfg):
    name = default_run_name(cfg)
    assert name == default_run_name(load_config(None, [f"mlflow.results_dir={cfg.mlflow.results_dir}"]))
    assert name.startswith("tf_efficientnet_lite0-")
    # where results go does not change the training; epochs (the schedule) and worker count do
    assert default_run_name(cfg.replace({"mlflow.experiment": "other", "ray.max_failures": 0})) == name
    assert default_run_name(cfg.replace({"train.epochs": 3})) != name
    assert default_run_name(cfg.replace({"ray.num_workers": 1})) != name


def test_resolve_paths_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = resolve_paths(load_config(None, ["data.root=data/x", "ray.storage_path=s3://bucket/ray"]))
    assert c.data.root == str(tmp_path.resolve() / "data/x")
    assert c.ray.storage_path == "s3://bucket/ray"
    assert c.mlflow.results_dir == str(tmp_path.resolve() / "results")
    assert c.data.train_file is None


def test_missing_data_is_reported_before_ray(tmp_path, tiny_demo_root):
    check_data_paths(load_config(None, [f"data.root={tiny_demo_root}"]))
    with pytest.raises(DataError, match=r"missing.*data\.root.*q2l data demo"):
        check_data_paths(load_config(None, [f"data.root={tmp_path / 'missing'}"]))
    ann = tmp_path / "ann.json"
    with pytest.raises(DataError, match=r"ann\.json: not found \(data\.test_annotations\)"):
        check_data_paths(load_config(None, [f"data.root={tiny_demo_root}", f"data.test_annotations={ann}"]))


def _summary(scores, targets):
    return summarize(torch.as_tensor(scores), torch.as_tensor(targets))


def test_precision_recall_curve_matches_sklearn_and_ap():
    from sklearn.metrics import precision_recall_curve as sk_curve

    rng = np.random.default_rng(0)
    scores = np.round(rng.random(200), 2)  # rounding makes ties
    targets = (rng.random(200) < 0.3).astype(np.float32)
    p, r = precision_recall_curve(scores, targets)
    sp, sr, _ = sk_curve(targets, scores)
    # sklearn lists the thresholds increasing and ends with (precision 1, recall 0): ours is the reverse
    np.testing.assert_allclose(r, sr[::-1])
    np.testing.assert_allclose(p, sp[::-1])
    ap = float(np.sum(np.diff(r) * p[1:]))
    expected = average_precision(torch.tensor(scores)[:, None], torch.tensor(targets)[:, None])[0].item()
    assert ap == pytest.approx(expected)


def test_evaluation_artifacts(tmp_path):
    rng = np.random.default_rng(1)
    targets = (rng.random((40, 5)) < 0.4).astype(np.float32)
    targets[:, 4] = 0  # a class without positives: no AP, excluded
    scores = np.clip(targets * 0.5 + rng.random((40, 5)) * 0.6, 0, 1).astype(np.float32)
    s = _summary(scores, targets)
    names = ["a", "b", "c", "d", "e"]
    best, worst = best_and_worst(s.per_class_ap, k=3)
    assert 4 not in best + worst and len(best) == len(worst) == 2
    assert s.per_class_ap[best[0]] >= s.per_class_ap[worst[0]]

    table = write_ap_table(tmp_path / "ap.csv", names, s, torch.tensor(targets))
    rows = list(csv.DictReader(table.open()))
    assert [r["class"] for r in rows] == names
    assert rows[4]["ap"] == "" and rows[4]["positives"] == "0"
    assert float(rows[0]["ap"]) == pytest.approx(100 * s.per_class_ap[0].item(), abs=1e-3)
    assert sorted(int(r["rank"]) for r in rows) == [1, 2, 3, 4, 5]
    bars = plot_ap_bars(tmp_path / "ap.png", names, s.per_class_ap, "t")
    curves = plot_pr_curves(
        tmp_path / "pr.png", torch.tensor(scores), torch.tensor(targets), names, best, worst, "t"
    )
    for f in (bars, curves):
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _epoch_result(epoch: int, model_map: float, ema_map: float | None) -> EpochResult:
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    m = _summary(torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.6]]), targets)
    m.map = model_map
    e = None
    if ema_map is not None:
        e = _summary(torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.1, 0.9]]), targets)
        e.map = ema_map
    train = {"loss": 1.5, "lr": 1e-4, "images": 64, "seconds": 2.0, "images_per_s": 32.0, "skipped_images": 0}
    return EpochResult(epoch, train, m, e, True, False, max(model_map, ema_map or -1))


def test_epoch_metrics_take_the_better_of_model_and_ema():
    r = _epoch_result(0, 40.0, 55.0)
    m = epoch_metrics(r)
    assert m["holdout_map"] == 55.0 and m["holdout_map_model"] == 40.0 and m["holdout_map_ema"] == 55.0
    assert m["holdout_best_is_ema"] == 1.0
    assert m["holdout_cf1"] == pytest.approx(r.holdout_ema.cf1)
    no_ema = epoch_metrics(_epoch_result(0, 40.0, None))
    assert math.isnan(no_ema["holdout_map_ema"]) and no_ema["holdout_best_is_ema"] == 0.0
    assert math.isnan(no_ema["steady_images_per_s"])  # not given by this engine result


def test_run_recorder_continues_a_run_without_duplicate_steps(cfg):
    import mlflow

    exp = tracking.ensure_experiment(cfg)
    rec = RunRecorder(cfg)
    run_id = rec.open(exp, run_id=None, run_name="r", launch_id="L1", parent_run_id="p" * 32, tags={"x": "1"})
    try:
        assert rec.log_metrics({"train_loss": 1.0, "holdout_map": 10.0}, step=1)
        assert not rec.log_metrics({"train_loss": 9.0, "holdout_map": 90.0}, step=1)  # already logged
        rec.fail(RuntimeError("boom"))
    finally:
        if mlflow.active_run():
            mlflow.end_run()
    client = rec.client
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags[ERROR_TAG] == "RuntimeError: boom"
    assert run.data.tags["mlflow.parentRunId"] == "p" * 32 and run.data.tags["q2l.version.torch"]
    assert run.data.params["train.epochs"] == str(cfg.train.epochs)

    # an attempt of the same launch without the id (died before its first checkpoint) finds the run
    again = RunRecorder(cfg.replace({"train.epochs": 7}))
    try:
        assert again.open(exp, run_id=None, run_name="r", launch_id="L1") == run_id
        assert again.logged_steps == {1}
        assert not again.log_metrics({"train_loss": 2.0}, step=1)
        assert again.log_metrics({"train_loss": 2.0}, step=2)
        again.finish()
    finally:
        if mlflow.active_run():
            mlflow.end_run()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and ERROR_TAG not in run.data.tags
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train_loss")] == [
        (1, 1.0),
        (2, 2.0),
    ]
    assert run.data.params["train.epochs"] == str(cfg.train.epochs)  # params are immutable
    assert run.data.tags["q2l.changed_param.train.epochs"] == "7"
    assert client.download_artifacts(run_id, "config.yaml")
    # another launch creates its own run
    other = RunRecorder(cfg)
    try:
        assert other.open(exp, run_id=None, run_name="r", launch_id="L2") != run_id
    finally:
        mlflow.end_run()


def test_config_error_exits_2_before_ray(tmp_path):
    code = (
        "import sys\n"
        "from q2l.cli import app\n"
        "try:\n"
        "    app(['train', '--set', 'optim.lrx=1'])\n"
        "except SystemExit as e:\n"
        "    print('ray imported:', 'ray' in sys.modules)\n"
        "    raise\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert p.returncode == 2, p.stderr
    assert "optim.lrx" in p.stderr
    assert "ray imported: False" in p.stdout


def test_unreachable_tracking_uri_fails_before_any_worker(tmp_path):
    code = (
        "import sys\n"
        "from q2l.config import load_config\n"
        "from q2l.tracking import TrackingUnavailableError\n"
        "from q2l.train import run_training\n"
        "cfg = load_config(None, ['mlflow.tracking_uri=http://127.0.0.1:1', 'ray.storage_path=ray'])\n"
        "try:\n"
        "    run_training(cfg)\n"
        "except TrackingUnavailableError as e:\n"
        "    print('error:', e)\n"
        "import ray\n"
        "print('ray started:', ray.is_initialized())\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert p.returncode == 0, p.stderr
    # the /health probe's error (not MLflow's retry loop), before Ray or any worker started
    assert "error: MLflow tracking server http://127.0.0.1:1 is not reachable" in p.stdout
    assert "ray started: False" in p.stdout
    assert not (Path(tmp_path) / "ray").exists()
