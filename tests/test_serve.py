"""Serving: ``mlflow models serve -m models:/NAME@champion --env-manager local`` answers a real HTTP request.

The server runs as a subprocess in its own process group on a free loopback port, with the tracking URI
pointing at a SQLite store under tmp; the whole group is stopped at the end.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import write_bomb_png, write_jpeg
from model_fixtures import reference_probs, tiny_model
from support import free_port, mlflow_uri

from q2l.config import config_from_dict
from q2l.packaging import MAX_IMAGES_PER_REQUEST, log_model

pytestmark = pytest.mark.slow

LABELS = ["apple", "bike", "cat"]
SIZE = 64
STARTUP_TIMEOUT_S = 180


def post(url: str, payload: dict, timeout: float = 60) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A tiny model registered as ``served`` with alias ``champion``: (tracking URI, the torch model)."""
    import mlflow

    from q2l import tracking

    torch.set_num_threads(1)
    cfg = config_from_dict({"mlflow": {"results_dir": str(tmp_path_factory.mktemp("results"))}})
    uri = tracking.tracking_uri(cfg)
    model = tiny_model(0, len(LABELS))
    with mlflow_uri(uri):  # log_model logs into the active (fluent) run
        with mlflow.start_run(experiment_id=tracking.ensure_experiment(cfg)):
            info = log_model(model, label_names=LABELS, image_size=SIZE, registered_model_name="served")
        tracking.client(cfg).set_registered_model_alias("served", "champion", info.registered_model_version)
    return uri, model


@pytest.fixture(scope="module")
def server(registered, tmp_path_factory):
    """``mlflow models serve`` of ``models:/served@champion``; yields its base URL."""
    tmp_path = tmp_path_factory.mktemp("serve")
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": registered[0],
        "MLFLOW_REGISTRY_URI": registered[0],
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


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def invocations(server: str, rows: list) -> tuple[int, dict]:
    return post(f"{server}/invocations", {"dataframe_split": {"columns": ["image"], "data": rows}})


def test_served_champion_answers_base64_and_paths(server, registered, tmp_path):
    _, model = registered
    images = [write_jpeg(tmp_path / f"img{k}.jpg", seed=k, h=40 + 10 * k, w=60) for k in range(3)]
    rows = [[b64(images[0])], [str(images[1])], [b64(images[2])]]
    status, body = invocations(server, rows)
    assert status == 200, body
    predictions = body["predictions"]
    assert len(predictions) == 3 and all(list(p) == LABELS for p in predictions)
    got = np.array([[p[n] for n in LABELS] for p in predictions])
    np.testing.assert_allclose(got, reference_probs(model, images, SIZE), atol=1e-5)
    assert ((got > 0) & (got < 1)).all()

    # an unreadable row fails the request with 400 and a message that names it; the server keeps serving
    status, body = invocations(server, [[str(images[0])], ["bm90IGFuIGltYWdl"]])
    assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "input row 1: not an existing file; as base64 image bytes: not a readable image" in body["message"]
    status, body = invocations(server, rows[:1])
    assert status == 200 and len(body["predictions"]) == 1


def test_oversized_requests_get_400_and_the_server_stays_up(server, tmp_path):
    """A 16000 x 16000 PNG (~275 kB of base64) and too many rows: refused before decoding, 400, named."""
    bomb = write_bomb_png(tmp_path / "bomb.png")
    small = write_jpeg(tmp_path / "small.jpg", seed=4)
    status, body = invocations(server, [[b64(small)], [b64(bomb)]])
    assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE"
    limit = "16000 x 16000 = 256000000 pixels exceeds the limit of 40000000 (data.max_image_pixels)"
    assert f"input row 1: not an existing file; as base64 image bytes: image of {limit}" in body["message"]

    status, body = invocations(server, [[b64(small)]] * (MAX_IMAGES_PER_REQUEST + 1))
    assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE"
    too_many = f"request refused: {MAX_IMAGES_PER_REQUEST + 1} images in one request; at most"
    assert too_many in body["message"]

    status, body = invocations(server, [[b64(small)]] * MAX_IMAGES_PER_REQUEST)
    assert status == 200 and len(body["predictions"]) == MAX_IMAGES_PER_REQUEST
