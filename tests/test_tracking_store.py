"""Where runs are recorded: MLflow's own variables, artifacts beside the store, read-only commands that
create nothing (q2l/tracking/store.py and the commands that resolve their config through it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from model_fixtures import TINY_ARCH, tiny_model
from PIL import Image

from q2l import tracking
from q2l.config import config_from_dict, resolve_config
from q2l.tracking.run_record import RunRecorder

Q2L = str(Path(sys.executable).with_name("q2l"))


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
    return {**env, **extra}


def test_artifacts_follow_a_sqlite_store_elsewhere(migrated_mlflow_db, tmp_path, monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    shutil.copyfile(migrated_mlflow_db, elsewhere / "mlflow.db")
    monkeypatch.chdir(work)
    cfg = config_from_dict(
        {"mlflow": {"tracking_uri": f"sqlite:///{elsewhere}/mlflow.db", "experiment": "x"}}
    )
    assert tracking.artifact_location(cfg) == str(elsewhere / "artifacts")

    recorder = RunRecorder(cfg)
    recorder.open(tracking.ensure_experiment(cfg), run_id=None, run_name="r", launch_id="l1")
    note = tmp_path / "note.txt"
    note.write_text("hello")
    recorder.log_artifact(note, "notes")
    recorder.finish()

    logged = list((elsewhere / "artifacts").rglob("note.txt"))
    assert len(logged) == 1 and logged[0].read_text() == "hello"
    assert not any(work.iterdir()), list(work.rglob("*"))  # nothing under ./results (or anywhere here)


def test_the_embedded_default_keeps_artifacts_under_results(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config_from_dict({})
    assert tracking.tracking_uri(cfg) == f"sqlite:///{tmp_path}/results/mlflow/mlflow.db"
    assert tracking.artifact_location(cfg) == str(tmp_path / "results" / "mlflow" / "artifacts")


def test_a_server_decides_where_artifacts_go():
    cfg = config_from_dict({"mlflow": {"tracking_uri": "http://127.0.0.1:5000"}})
    assert tracking.artifact_location(cfg) is None


def test_commands_take_mlflow_variables_when_the_config_is_silent(tmp_path):
    uri = f"sqlite:///{tmp_path}/env.db"
    study = f"sqlite:///{tmp_path}/optuna.db"
    env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "from-env", "Q2L_OPTUNA_STORAGE": study}
    cfg = resolve_config(None, [], environ=env).config
    assert tracking.tracking_uri(cfg) == uri and cfg.mlflow.experiment == "from-env"
    assert cfg.tune.storage == study  # a cluster names its study database for every sweep run on it
    cfg = resolve_config(None, ["mlflow.experiment=from-set"], environ=env).config
    assert cfg.mlflow.experiment == "from-set"


def test_read_only_access_never_creates_a_store(tmp_path):
    cfg = config_from_dict({"mlflow": {"results_dir": str(tmp_path / "results")}})
    with pytest.raises(tracking.TrackingUnavailableError, match="no MLflow store at sqlite:///"):
        tracking.client(cfg, must_exist=True)
    with pytest.raises(tracking.TrackingUnavailableError, match="no MLflow store"):
        tracking.activate(tracking.tracking_uri(cfg), must_exist=True)
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_predict_and_config_show_create_nothing(tmp_path):
    """``q2l predict`` (a checkpoint, no config) and ``q2l config show`` leave the folder as it was."""
    cfg = config_from_dict(
        {
            "data": {"image_size": 32},
            "model": {"backbone": "test_efficientnet", "pretrained": False, **TINY_ARCH},
        }
    )
    ckpt = tmp_path / "best.pt"
    model = tiny_model(0, 2)
    torch.save(
        {"model": model.state_dict(), "label_names": ["a", "b"], "image_size": 32, "config": cfg.to_yaml()},
        ckpt,
    )
    image = tmp_path / "x.png"
    Image.fromarray(np.full((40, 40, 3), 120, dtype=np.uint8)).save(image)
    work = tmp_path / "work"
    work.mkdir()
    for args in (["predict", "--model", str(ckpt), str(image)], ["config", "show"]):
        out = subprocess.run(
            [Q2L, *args], cwd=work, env=_clean_env(), capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr
        assert not any(work.iterdir()), (args, list(work.rglob("*")))
