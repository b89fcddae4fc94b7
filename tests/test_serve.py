"""Serving: ``mlflow models serve -m models:/NAME@champion --env-manager local`` answers a real HTTP request.

The server runs as a subprocess in its own process group on a free loopback port, with the tracking URI
pointing at a SQLite store under tmp; the whole group is stopped at the end.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import write_jpeg
from model_fixtures import tiny_model

from q2l.config import config_from_dict
from q2l.packaging import load_predictor, log_model

pytestmark = pytest.mark.slow

LABELS = ["apple", "bike", "cat"]
SIZE = 64
STARTUP_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, payload: dict, timeout: float = 60) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture
def registered(tmp_path):
    """A tiny model registered as ``served`` with alias ``champion``; returns the tracking URI."""
    import mlflow

    from q2l.tracking import ensure_experiment, tracking_uri

    torch.set_num_threads(1)
    cfg = config_from_dict({"mlflow": {"results_dir": str(tmp_path / "results")}})
    uri = tracking_uri(cfg)
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        model = tiny_model(0, len(LABELS))
        with mlflow.start_run(experiment_id=ensure_experiment(cfg)):
            info = log_model(model, label_names=LABELS, image_size=SIZE, registered_model_name="served")
        mlflow.MlflowClient().set_registered_model_alias("served", "champion", info.registered_model_version)
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
    return uri


@pytest.fixture
def server(registered, tmp_path):
    """``mlflow models serve`` of ``models:/served@champion``; yields its base URL."""
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": registered,
        "MLFLOW_REGISTRY_URI": registered,
        # MLflow execs `uvicorn` by name: the environment's bin folder must be on PATH (an activated venv)
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    log = (tmp_path / "serve.log").open("wb")
    cmd = [
        sys.executable, "-m", "mlflow", "models", "serve",
        "-m", "models:/served@champion",
        "--env-manager", "local",
        "--host", "127.0.0.1",
        "-p", str(port),
        "--workers", "1",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{(tmp_path / 'serve.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no /ping after {STARTUP_TIMEOUT_S} s:\n{(tmp_path / 'serve.log').read_text()}")
            time.sleep(0.5)
        yield base
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        log.close()


def test_served_champion_answers_base64_and_paths(server, registered, tmp_path):
    import mlflow

    images = [write_jpeg(tmp_path / f"img{k}.jpg", seed=k, h=40 + 10 * k, w=60) for k in range(3)]
    rows = [
        [base64.b64encode(images[0].read_bytes()).decode()],
        [str(images[1])],
        [base64.b64encode(images[2].read_bytes()).decode()],
    ]
    status, body = post(f"{server}/invocations", {"dataframe_split": {"columns": ["image"], "data": rows}})
    assert status == 200, body
    predictions = body["predictions"]
    assert len(predictions) == 3 and all(list(p) == LABELS for p in predictions)
    got = np.array([[p[n] for n in LABELS] for p in predictions])

    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(registered)
    mlflow.set_registry_uri(registered)
    try:
        expected, failures = load_predictor("models:/served@champion", device="cpu").predict_paths(images)
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
    assert not failures
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert ((got > 0) & (got < 1)).all()

    # an unreadable row fails the request with a message that names it; the server keeps serving
    bad = {"dataframe_split": {"columns": ["image"], "data": [[str(images[0])], ["bm90IGFuIGltYWdl"]]}}
    status, body = post(f"{server}/invocations", bad)
    assert 400 <= status < 600 and "row 1" in json.dumps(body)
    status, body = post(
        f"{server}/invocations", {"dataframe_split": {"columns": ["image"], "data": rows[:1]}}
    )
    assert status == 200 and len(body["predictions"]) == 1
    assert Path(images[1]).is_file()
