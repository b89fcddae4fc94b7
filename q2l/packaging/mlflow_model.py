"""A Query2Label model as an MLflow "models from code" pyfunc, and loading a model back from anywhere.

A packaged model (docs/design.md §7) is:

- ``pyfunc_model.py``: the short code file MLflow executes when it loads the pyfunc (serving, ``mlflow.pyfunc
  .load_model``); it builds the architecture from the installed ``q2l`` package;
- ``artifacts/weights.safetensors``: the weights (safetensors holds tensors only: loading runs no code);
- ``artifacts/q2l_model.json``: architecture, label names (in output order), image size, mean/std.

No pickled Python object is stored. ``load_predictor`` (used by ``q2l predict``/``q2l promote``) does not even
run the code file: it reads the two artifacts and builds the model from the installed package.
"""

from __future__ import annotations

import base64
import io
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from q2l.data.images import DEFAULT_MAX_PIXELS
from q2l.models import Query2Label
from q2l.packaging.checkpoint_model import predictor_from_checkpoint
from q2l.packaging.predictor import Predictor, predictor_from_files, save_weights
from q2l.packaging.spec import MODEL_JSON, WEIGHTS_FILE, PackagingError, model_spec

MODEL_NAME = "model"  # the packaged model's name in a training run (what sweeps register)
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
# Distributions the pyfunc imports when it loads; pinned to what logged it. ``q2l`` itself is not on PyPI:
# serve from an environment where it is installed (``--env-manager local``) or from a private index.
_REQUIREMENTS = ("q2l", "torch", "torchvision", "timm", "safetensors", "numpy", "pandas", "pillow", "mlflow")


def _default_input_example(image_size: int) -> Any:
    """A one-row DataFrame holding a base64 PNG (a smooth colour ramp) of the model's input size."""
    import pandas as pd
    from PIL import Image

    ramp = np.linspace(0, 255, image_size, dtype=np.uint8)
    rgb = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], np.uint8(128)), axis=-1)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG")
    return pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode("ascii")]})


def _signature(label_names: list[str]):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = Schema([ColSpec("string", "image")])
    outputs = Schema([ColSpec("float", name) for name in label_names])
    return ModelSignature(inputs=inputs, outputs=outputs)


def _pip_requirements() -> list[str]:
    import importlib.metadata

    reqs = []
    for dist in _REQUIREMENTS:
        try:
            reqs.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            reqs.append(dist)
    return reqs


def log_model(
    model: Query2Label,
    *,
    label_names: list[str],
    image_size: int,
    name: str = MODEL_NAME,
    input_example: Any = None,
    registered_model_name: str | None = None,
):
    """Log ``model`` into the active MLflow run as a models-from-code pyfunc; returns MLflow's ``ModelInfo``.

    Input: a DataFrame column ``image`` of file paths or base64-encoded image bytes (at most
    ``q2l.packaging.inputs.MAX_IMAGES_PER_REQUEST`` rows per call); output: a DataFrame of probabilities with
    one column per label name. ``input_example`` defaults to a one-row DataFrame with a base64 PNG.
    ``registered_model_name`` also registers a new model version.
    """
    import mlflow

    if mlflow.active_run() is None:
        raise PackagingError("log_model needs an active MLflow run (mlflow.start_run())")
    spec = model_spec(model, label_names, image_size)
    with tempfile.TemporaryDirectory(prefix="q2l-package-") as tmp:
        spec_path = Path(tmp) / MODEL_JSON
        spec_path.write_text(spec.to_json())
        weights_path = Path(tmp) / WEIGHTS_FILE
        save_weights(model, weights_path)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(PYFUNC_CODE),
            artifacts={"q2l_model": str(spec_path), "weights": str(weights_path)},
            signature=_signature(spec.label_names),
            input_example=input_example if input_example is not None else _default_input_example(image_size),
            pip_requirements=_pip_requirements(),
            registered_model_name=registered_model_name,
            metadata={"q2l_label_names": spec.label_names, "q2l_image_size": spec.image_size},
        )


def _artifact_path(folder: Path, relative: Any, source: str) -> Path:
    """``folder / relative``, refused unless it stays inside ``folder`` (an MLmodel is untrusted text)."""
    if not isinstance(relative, str):
        raise PackagingError(f"{source}: its MLmodel names an artifact path that is not text: {relative!r}")
    path = (folder / relative).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise PackagingError(f"{source}: its MLmodel points outside the model folder: {relative!r}")
    return path


def predictor_from_model_dir(
    path: Path, source: str, device=None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Predictor:
    """A ``Predictor`` from an MLflow model folder, via its artifacts (the code file is not run)."""
    import yaml

    try:
        mlmodel = yaml.safe_load((path / "MLmodel").read_text())
        artifacts = mlmodel["flavors"]["python_function"]["artifacts"]
        spec_rel = artifacts["q2l_model"]["path"]
        weights_rel = artifacts["weights"]["path"]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as e:
        raise PackagingError(
            f"{source}: not a q2l packaged model (its MLmodel has no q2l_model/weights artifacts: {e!r})"
        ) from None
    spec_path = _artifact_path(path, spec_rel, source)
    weights_path = _artifact_path(path, weights_rel, source)
    return predictor_from_files(spec_path, weights_path, device, max_pixels)


def load_predictor(
    uri: str,
    device: str | torch.device | None = None,
    *,
    tracking_uri: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Predictor:
    """Load a packaged model or a training checkpoint for prediction.

    ``uri``: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN_ID/model`` (any MLflow artifact
    URI of a model logged by ``log_model``), a local MLflow model folder, or a local checkpoint file / Ray
    checkpoint folder written by training. MLflow URIs are looked up in ``tracking_uri`` (tracking and
    registry; MLflow's current URI when None). ``max_pixels`` is the predictor's decoding budget.
    """
    local = Path(uri).expanduser()
    if "://" not in uri and ":/" not in uri[:10]:
        if not local.exists():
            raise PackagingError(f"{uri}: no such file or folder (and not a models:/ or runs:/ URI)")
        if (local / "MLmodel").is_file():
            return predictor_from_model_dir(local, uri, device, max_pixels)
        return predictor_from_checkpoint(local, device, max_pixels)
    import mlflow
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="q2l-model-") as tmp:
        try:
            path = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=uri, dst_path=tmp, tracking_uri=tracking_uri, registry_uri=tracking_uri
                )
            )
        except MlflowException as e:
            raise PackagingError(f"{uri}: cannot be resolved: {e.message}") from None
        except OSError as e:
            raise PackagingError(f"{uri}: cannot be downloaded: {e}") from None
        if path.is_file() or not (path / "MLmodel").is_file():
            # e.g. runs:/ID/checkpoints/best.pt, the best weights a training run logs
            return predictor_from_checkpoint(path, device, max_pixels)
        return predictor_from_model_dir(path, uri, device, max_pixels)
