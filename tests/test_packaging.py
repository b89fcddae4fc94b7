"""Model packaging: the logged pyfunc (models from code + safetensors) and ``load_predictor`` round trips.

A tiny Query2Label (timm ``test_efficientnet``, 64 px, 4 labels) is logged into a SQLite MLflow store under
tmp; its outputs are compared with the torch model's own sigmoid on the same real JPEGs, preprocessed
independently (``model_fixtures.reference_probs``: decode, squish resize, ``(x/255 - mean)/std``).
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from data_fixtures import write_jpeg
from model_fixtures import TINY_ARCH, reference_probs, tiny_model
from support import mlflow_uri

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
    from q2l.tracking import ensure_experiment, tracking_uri

    cfg = config_from_dict({"mlflow": {"results_dir": str(tmp_path_factory.mktemp("results"))}})
    with mlflow_uri(tracking_uri(cfg)):
        yield ensure_experiment(cfg)


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


# ------------------------------------------------------------------ crafted descriptions and checkpoints
def valid_description() -> dict:
    return json.loads(model_spec(tiny_model(1, len(LABELS)), LABELS, SIZE).to_json())


def with_change(doc: dict, dotted: str, value) -> dict:
    """``doc`` with ``dotted`` (``a`` or ``a.b``) set to ``value``; ``...`` (Ellipsis) deletes the key."""
    *parents, key = dotted.split(".")
    target = doc
    for p in parents:
        target = target[p]
    if value is ...:
        del target[key]
    else:
        target[key] = value
    return doc


CRAFTED_DESCRIPTIONS = [
    # (field, value, what the error says)
    ("architecture.hidden_dim", 32768, "architecture.hidden_dim = 32768 is out of range [8, 8192]"),
    ("architecture.hidden_dim", 30, "architecture.hidden_dim = 30 is not a multiple of 4"),
    ("architecture.num_heads", 3, "architecture.hidden_dim = 32 must divide by architecture.num_heads = 3"),
    ("architecture.hidden_dim", "32", "architecture.hidden_dim = '32' must be of type int"),
    ("architecture.num_heads", 0, "architecture.num_heads = 0 is out of range"),
    ("architecture.dec_layers", 99, "architecture.dec_layers = 99 is out of range [1, 12]"),
    ("architecture.dim_feedforward", 10**9, "architecture.dim_feedforward = 1000000000 is out of range"),
    ("architecture.dropout", 1.0, "architecture.dropout = 1.0 is out of range [0.0, 1.0)"),
    ("architecture.backbone", "no_such_net", "architecture.backbone = 'no_such_net' is not a timm model"),
    ("architecture.num_classes", 5, "architecture.num_classes = 5 but there are 4 label names"),
    ("architecture.input_proj", "yes", "architecture.input_proj must be true or false"),
    ("architecture.extra", 1, "architecture keys: missing none, unknown ['extra']"),
    ("architecture.enc_layers", ..., "architecture keys: missing ['enc_layers']"),
    ("architecture", [1, 2], "architecture must be a JSON object"),
    ("image_size", 0, "image_size = 0 is out of range [16, 2048]"),
    ("image_size", 100000, "image_size = 100000 is out of range"),
    ("image_size", 64.0, "image_size must be an intege"),
    ("image_size", True, "image_size must be an intege"),
    ("label_names", ["apple", "apple", "cat", "dog"], "label_names must be unique, repeated: ['apple']"),
    ("label_names", ["apple", 2, "cat", "dog"], "label_names must be non-empty strings, got 2"),
    ("label_names", ["apple", "", "cat", "dog"], "label_names must be non-empty strings"),
    ("label_names", "apple", "label_names must be a non-empty list of strings"),
    ("label_names", [], "label_names must be a non-empty list of strings"),
    ("mean", [0.5, 0.5], "mean must be 3 finite numbers"),
    ("mean", [0.5, 0.5, 300], "mean values must be within [0, 1]"),
    ("mean", [0.5, 0.5, "x"], "mean must be 3 finite numbers"),
    ("std", [0.2, 0.0, 0.2], "std values must be positive"),
    ("std", [0.2, -1, 0.2], "std values must be positive"),
    ("format_version", 2, "format_version = 2, this q2l reads 1"),
    ("format_version", "1", "format_version = '1', this q2l reads 1"),
    ("format_version", ..., "keys: missing ['format_version']"),
    ("q2l_version", ["x"], "q2l_version must be a short string"),
    ("weights_url", "http://x", "keys: missing none, unknown ['weights_url']"),
]


@pytest.mark.parametrize(("field", "value", "message"), CRAFTED_DESCRIPTIONS, ids=lambda v: str(v)[:40])
def test_crafted_descriptions_are_refused_before_any_build(tmp_path, field, value, message):
    """Every field of ``q2l_model.json`` is checked; the error names the file and the field."""
    path = tmp_path / MODEL_JSON
    path.write_text(json.dumps(with_change(valid_description(), field, value)))
    with pytest.raises(PackagingError, match=f"^{re.escape(f'{path}: {message}')}"):
        ModelSpec.from_json(path)


def test_non_finite_numbers_and_odd_documents_are_refused(tmp_path):
    path = tmp_path / MODEL_JSON
    text = json.dumps(with_change(valid_description(), "std", [float("nan"), 0.2, 0.2]))  # NaN: not JSON
    for bad, message in [
        (text, "std must be 3 finite numbers"),
        ("[1, 2, 3]", "expected a JSON object"),
        ("[" * 100_000, "not a readable q2l model description"),
        ("", "not a readable q2l model description"),
    ]:
        path.write_text(bad)
        with pytest.raises(PackagingError, match=f"^{path}: {message}"):
            ModelSpec.from_json(path)
    path.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(PackagingError, match="not a readable q2l model description"):
        ModelSpec.from_json(path)


def write_model_dir(root: Path, description: dict, spec_rel: str = f"artifacts/{MODEL_JSON}") -> Path:
    """A local MLflow model folder as ``log_model`` writes it (MLmodel + the two artifacts)."""
    from q2l.packaging import save_weights

    (root / "artifacts").mkdir(parents=True)
    (root / "artifacts" / MODEL_JSON).write_text(json.dumps(description))
    save_weights(tiny_model(1, len(LABELS)), root / "artifacts" / WEIGHTS_FILE)
    artifacts = {"q2l_model": {"path": spec_rel}, "weights": {"path": f"artifacts/{WEIGHTS_FILE}"}}
    mlmodel = {"flavors": {"python_function": {"artifacts": artifacts, "loader_module": "x"}}}
    (root / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    return root


def test_crafted_model_folder_exits_2_from_the_cli(tmp_path, images):
    """``q2l predict`` with a model folder whose description asks for hidden_dim 32768: exit 2, no build."""
    from typer.testing import CliRunner

    from q2l.cli import app

    good = write_model_dir(tmp_path / "good", valid_description())
    probs, failures = load_predictor(str(good), device="cpu").predict_paths(images[:1])
    assert failures == [] and probs.shape == (1, len(LABELS))

    bad = write_model_dir(
        tmp_path / "bad", with_change(valid_description(), "architecture.hidden_dim", 32768)
    )
    result = CliRunner().invoke(app, ["predict", "--model", str(bad), str(images[0])])
    assert result.exit_code == 2, result.output
    assert f"{bad}/artifacts/{MODEL_JSON}: architecture.hidden_dim = 32768 is out of range" in result.output

    # an MLmodel may not point outside its folder
    outside = write_model_dir(
        tmp_path / "outside", valid_description(), spec_rel=f"../good/artifacts/{MODEL_JSON}"
    )
    with pytest.raises(PackagingError, match="points outside the model folder"):
        load_predictor(str(outside))


def checkpoint_state(net, **changes) -> dict:
    cfg = config_from_dict(
        {
            "data": {"image_size": SIZE},
            "model": {"backbone": "test_efficientnet", "pretrained": False, **TINY_ARCH},
        }
    )
    state = {"model": net.state_dict(), "label_names": LABELS, "image_size": SIZE, "config": cfg.to_yaml()}
    return {**state, **changes}


def test_crafted_checkpoints_are_refused_before_any_build(tmp_path):
    """Every field of ``best.pt`` is checked (the config through the config's own validation)."""
    model = tiny_model(3, len(LABELS))
    raw = yaml.safe_load(checkpoint_state(model)["config"])
    huge = yaml.safe_dump({**raw, "model": {**raw["model"], "hidden_dim": 32768}})
    unknown = yaml.safe_dump({**raw, "model": {**raw["model"], "backbone": "no_such_net"}})
    cases = [
        ({"config": huge}, r"model.hidden_dim = 32768 is out of range \[8, 8192\]"),
        ({"config": unknown}, "model.backbone = 'no_such_net' is not a timm model"),
        ({"config": "{unclosed: ["}, "its config cannot be read"),
        ({"config": 5}, "config must be the resolved config as YAML text"),
        ({"image_size": 0}, r"image_size = 0 is out of range \[16, 2048\]"),
        ({"image_size": "64"}, "image_size must be an integer"),
        ({"label_names": ["a", "a", "b", "c"]}, "label_names must be unique"),
        ({"label_names": "abcd"}, "label_names must be a non-empty list"),
        ({"model": [1, 2]}, "model must be a state dict"),
        ({"model": {"w": 1.0}}, r"model\['w'\] is not a named tensor"),
        ({"label_names": LABELS[:3]}, "the weights do not fit the architecture"),
    ]
    path = tmp_path / "best.pt"
    for change, message in cases:
        torch.save(checkpoint_state(model, **change), path)
        with pytest.raises(PackagingError, match=f"^{path}: .*{message}"):
            load_predictor(str(path), device="cpu")
    torch.save([1, 2, 3], path)
    with pytest.raises(PackagingError, match="not a q2l checkpoint"):
        load_predictor(str(path))


def test_request_limits_and_pixel_budget(tmp_path):
    """Too many rows, a row too long, an image over the pixel budget: refused before decoding, named."""
    from data_fixtures import write_bomb_png

    from q2l.data.images import BadImageError
    from q2l.packaging import MAX_IMAGES_PER_REQUEST, MAX_INPUT_CHARS, RequestTooLargeError, check_request
    from q2l.packaging.inputs import decode_source

    check_request(["x"] * MAX_IMAGES_PER_REQUEST)
    with pytest.raises(RequestTooLargeError, match=f"{MAX_IMAGES_PER_REQUEST + 1} images in one request"):
        check_request(["x"] * (MAX_IMAGES_PER_REQUEST + 1))
    with pytest.raises(RequestTooLargeError, match=f"row 1: {MAX_INPUT_CHARS + 1} characters"):
        check_request(["x", "A" * (MAX_INPUT_CHARS + 1)])

    bomb = write_bomb_png(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 400_000
    for source in (b64(bomb), bomb.read_bytes(), str(bomb)):
        with pytest.raises(
            BadImageError, match="16000 x 16000 = 256000000 pixels exceeds the limit of 40000000"
        ):
            decode_source(source, "row 0")
    predictor = predictor_from_files_of(tmp_path, max_pixels=2000)
    probs, failures = predictor.predict_paths([bomb])
    assert np.isnan(probs).all() and "exceeds the limit of 2000" in failures[0][1]


def predictor_from_files_of(root: Path, max_pixels: int):
    from q2l.packaging import save_weights

    (root / MODEL_JSON).write_text(json.dumps(valid_description()))
    save_weights(tiny_model(1, len(LABELS)), root / WEIGHTS_FILE)
    return predictor_from_files(root / MODEL_JSON, root / WEIGHTS_FILE, device="cpu", max_pixels=max_pixels)
