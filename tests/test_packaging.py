"""Model packaging: the logged pyfunc (models from code + safetensors) and ``load_predictor`` round trips.

A tiny Query2Label (timm ``test_efficientnet``, 64 px, 4 labels) is logged into a SQLite MLflow store under
tmp; its outputs are compared with the torch model's own sigmoid on the same real JPEGs, preprocessed
independently (``model_fixtures.reference_probs``: decode, squish resize, ``(x/255 - mean)/std``).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from data_fixtures import write_jpeg
from model_fixtures import TINY_ARCH, reference_probs, tiny_model

from q2l.config import config_from_dict
from q2l.packaging import (
    MODEL_JSON,
    WEIGHTS_FILE,
    ModelSpec,
    PackagingError,
    load_predictor,
    log_model,
    model_spec,
    predictor_from_files,
)

LABELS = ["apple", "bike", "cat", "dog"]
SIZE = 64


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("images")
    # different sizes and aspect ratios: the squish resize must match training's
    return [write_jpeg(root / f"img{k}.jpg", seed=k, h=40 + 8 * k, w=48 + 5 * k) for k in range(5)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite MLflow store under tmp, made the current tracking/registry URI for this module."""
    import mlflow

    from q2l.tracking import ensure_experiment, tracking_uri

    cfg = config_from_dict({"mlflow": {"results_dir": str(tmp_path_factory.mktemp("results"))}})
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(tracking_uri(cfg))
    mlflow.set_registry_uri(tracking_uri(cfg))
    experiment_id = ensure_experiment(cfg)
    yield experiment_id
    mlflow.set_tracking_uri(previous[0])
    mlflow.set_registry_uri(previous[1])


@pytest.fixture(scope="module")
def logged(store):
    """One logged + registered tiny model: (model, ModelInfo, run id)."""
    import mlflow

    torch.set_num_threads(1)
    model = tiny_model(0, len(LABELS))
    with mlflow.start_run(experiment_id=store) as run:
        info = log_model(model, label_names=LABELS, image_size=SIZE, registered_model_name="pkg-test")
    return model, info, run.info.run_id


@pytest.mark.slow
def test_logged_pyfunc_matches_torch_model_for_batch_1_and_5(logged, images):
    import mlflow

    model, info, _ = logged
    expected = reference_probs(model, images, SIZE)
    pyfunc = mlflow.pyfunc.load_model(info.model_uri)

    one = pyfunc.predict(pd.DataFrame({"image": [b64(images[0])]}))
    assert list(one.columns) == LABELS and one.shape == (1, len(LABELS))
    np.testing.assert_allclose(one.to_numpy(), expected[:1], atol=1e-5)

    # five rows mixing base64 bytes, a data URI and file paths
    rows = [
        b64(images[0]),
        str(images[1]),
        f"data:image/jpeg;base64,{b64(images[2])}",
        str(images[3]),
        b64(images[4]),
    ]
    five = pyfunc.predict(pd.DataFrame({"image": rows}))
    assert five.shape == (5, len(LABELS))
    np.testing.assert_allclose(five.to_numpy(), expected, atol=1e-5)
    # the model is informative enough to tell images apart (otherwise the comparison proves little)
    assert np.ptp(expected, axis=0).max() > 1e-4


@pytest.mark.slow
def test_package_holds_no_pickle_and_describes_itself(logged):
    import mlflow

    _, info, _ = logged
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    pyfunc_conf = mlmodel["flavors"]["python_function"]
    assert pyfunc_conf["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert "python_model" not in pyfunc_conf  # no cloudpickled object
    assert not [p for p in local.rglob("*") if p.suffix in (".pkl", ".pickle", ".pt", ".pth")]
    spec = json.loads((local / pyfunc_conf["artifacts"]["q2l_model"]["path"]).read_text())
    assert spec["label_names"] == LABELS and spec["image_size"] == SIZE
    assert spec["architecture"]["backbone"] == "test_efficientnet"
    assert spec["architecture"]["hidden_dim"] == 32
    assert (local / "artifacts" / WEIGHTS_FILE).is_file()
    inputs = json.loads(mlmodel["signature"]["inputs"])
    outputs = json.loads(mlmodel["signature"]["outputs"])
    assert [c["name"] for c in inputs] == ["image"] and inputs[0]["type"] == "string"
    assert [c["name"] for c in outputs] == LABELS
    assert (local / "serving_input_example.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("uri_kind", ["runs", "models_version", "local_dir"])
def test_load_predictor_from_mlflow_uris(logged, images, uri_kind, tmp_path):
    import mlflow

    model, info, run_id = logged
    uri = {
        "runs": f"runs:/{run_id}/model",
        "models_version": f"models:/pkg-test/{info.registered_model_version}",
        "local_dir": None,
    }[uri_kind]
    if uri is None:
        uri = mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path))
    predictor = load_predictor(uri, device="cpu")
    assert predictor.label_names == LABELS and predictor.image_size == SIZE
    probs, failures = predictor.predict_paths(images, batch_size=2)
    assert failures == []
    np.testing.assert_allclose(probs, reference_probs(model, images, SIZE), atol=1e-5)


def test_load_predictor_from_training_checkpoint(images, tmp_path):
    """The train layer's best.pt (state dict, label names, image size, config YAML) loads as a predictor."""
    torch.set_num_threads(1)
    model = tiny_model(3, len(LABELS))
    cfg = config_from_dict(
        {
            "data": {"image_size": SIZE},
            "model": {"backbone": "test_efficientnet", "pretrained": False, **TINY_ARCH},
        }
    )
    ckpt_dir = tmp_path / "checkpoint_000003"
    ckpt_dir.mkdir()
    state = {"model": model.state_dict(), "label_names": LABELS, "image_size": SIZE, "config": cfg.to_yaml()}
    torch.save(state, ckpt_dir / "best.pt")
    expected = reference_probs(model, images, SIZE)
    for uri in (str(ckpt_dir / "best.pt"), str(ckpt_dir)):
        probs, _ = load_predictor(uri, device="cpu").predict_paths(images)
        np.testing.assert_allclose(probs, expected, atol=1e-5)

    torch.save({"model": model.state_dict(), "format": 1}, tmp_path / "engine.pt")
    with pytest.raises(PackagingError, match="missing label_names, image_size, config"):
        load_predictor(str(tmp_path / "engine.pt"))
    with pytest.raises(PackagingError, match="no such file"):
        load_predictor(str(tmp_path / "nope.pt"))


@pytest.mark.slow
def test_bad_requests_name_the_row(logged, images):
    import mlflow
    from mlflow.exceptions import MlflowException

    _, info, _ = logged
    pyfunc = mlflow.pyfunc.load_model(info.model_uri)
    bad = base64.b64encode(b"definitely not an image").decode()
    with pytest.raises((ValueError, MlflowException), match=r"row 1.*not an existing file"):
        pyfunc.predict(pd.DataFrame({"image": [str(images[0]), bad]}))
    with pytest.raises((ValueError, MlflowException), match="row 0.*neither an existing file nor base64"):
        pyfunc.predict(pd.DataFrame({"image": ["/no/such/file.jpg"]}))


def test_spec_and_weights_are_checked(tmp_path):
    model = tiny_model(1, len(LABELS))
    with pytest.raises(PackagingError, match="3 label names"):
        model_spec(model, LABELS[:3], SIZE)
    with pytest.raises(PackagingError, match="unique"):
        model_spec(model, ["a", "a", "b", "c"], SIZE)

    broken = tmp_path / MODEL_JSON
    broken.write_text("{not json")
    with pytest.raises(PackagingError, match=str(broken)):
        ModelSpec.from_json(broken)

    # weights of a wider model do not fit the described architecture: refused, naming the file
    from q2l.packaging import save_weights

    spec_path = tmp_path / "spec.json"
    spec_path.write_text(model_spec(model, LABELS, SIZE).to_json())
    save_weights(tiny_model(1, len(LABELS), hidden_dim=64), tmp_path / WEIGHTS_FILE)
    with pytest.raises(PackagingError, match="do not fit"):
        predictor_from_files(spec_path, tmp_path / WEIGHTS_FILE)


@pytest.mark.slow
def test_log_model_needs_an_active_run(store):
    with pytest.raises(PackagingError, match="active MLflow run"):
        log_model(tiny_model(0, len(LABELS)), label_names=LABELS, image_size=SIZE)
