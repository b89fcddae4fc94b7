"""Model packaging: a Query2Label model as a safe, self-describing MLflow pyfunc, and loading it back.

A packaged model is an MLflow "models from code" pyfunc (DESIGN §7):

- ``pyfunc_model.py``: the short code file MLflow executes when it loads the pyfunc (serving, ``mlflow.pyfunc
  .load_model``); it builds the architecture from the installed ``q2l`` package;
- ``artifacts/weights.safetensors``: the weights (safetensors holds tensors only: loading runs no code);
- ``artifacts/q2l_model.json``: architecture, label names (in output order), image size, mean/std.

No pickled Python object is stored. ``load_predictor`` (used by ``q2l predict``/``q2l promote``) does not even
run the code file: it reads the two artifacts and builds the model from the installed package.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import q2l
from q2l.data.images import BadImageError, decode_rgb
from q2l.data.transforms import squish_resize
from q2l.models import Query2Label
from q2l.models.pretrained import LITE0

MODEL_JSON = "q2l_model.json"
WEIGHTS_FILE = "weights.safetensors"
FORMAT_VERSION = 1
# the train layer's best weights inside a Ray checkpoint folder (q2l.train.BEST_FILE)
BEST_CHECKPOINT_FILE = "best.pt"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
# Distributions the pyfunc imports when it loads; pinned to what logged it. ``q2l`` itself is not on PyPI:
# serve from an environment where it is installed (``--env-manager local``) or from a private index.
_REQUIREMENTS = ("q2l", "torch", "torchvision", "timm", "safetensors", "numpy", "pandas", "pillow", "mlflow")


class PackagingError(Exception):
    """A model that cannot be packaged or loaded; the message names the file, key or URI."""


@dataclass
class ModelSpec:
    """What travels with the weights: Query2Label arguments, labels (output order) and preprocessing."""

    architecture: dict[str, Any]
    label_names: list[str]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    q2l_version: str = q2l.__version__
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if len(set(self.label_names)) != len(self.label_names):
            raise PackagingError(f"label names must be unique, got {self.label_names}")
        if self.architecture.get("num_classes") != len(self.label_names):
            raise PackagingError(
                f"the model has {self.architecture.get('num_classes')} outputs but {len(self.label_names)} "
                f"label names were given"
            )
        if len(self.mean) != 3 or len(self.std) != 3:
            raise PackagingError(f"mean and std must have 3 values, got mean={self.mean} std={self.std}")

    def to_json(self) -> str:
        """The JSON document stored as ``q2l_model.json``."""
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, path: str | Path) -> ModelSpec:
        """Read and check ``q2l_model.json``; errors name the file and the key."""
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PackagingError(f"{path}: not a readable q2l model description ({e})") from None
        if not isinstance(raw, dict):
            raise PackagingError(f"{path}: expected a JSON object")
        if raw.get("format_version") != FORMAT_VERSION:
            raise PackagingError(
                f"{path}: format_version = {raw.get('format_version')!r}, this q2l reads {FORMAT_VERSION}"
            )
        missing = [k for k in ("architecture", "label_names", "image_size", "mean", "std") if k not in raw]
        if missing:
            raise PackagingError(f"{path}: missing key(s) {', '.join(missing)}")
        try:
            return cls(
                architecture=dict(raw["architecture"]),
                label_names=[str(n) for n in raw["label_names"]],
                image_size=int(raw["image_size"]),
                mean=tuple(float(v) for v in raw["mean"]),
                std=tuple(float(v) for v in raw["std"]),
                q2l_version=str(raw.get("q2l_version", "unknown")),
            )
        except (TypeError, ValueError) as e:
            raise PackagingError(f"{path}: {e}") from None


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def architecture_of(model: Query2Label) -> dict[str, Any]:
    """The ``Query2Label(...)`` keyword arguments that rebuild ``model``'s architecture.

    Read from the modules themselves (the model does not keep its constructor arguments), so whatever built
    the model (config, notebook, test) is described the same way. A strict ``load_state_dict`` when loading
    catches any shape disagreement.
    """
    model = _unwrap(model)
    if not isinstance(model, Query2Label):
        raise PackagingError(f"expected a Query2Label model, got {type(model).__name__}")
    first_dec = model.transformer.decoder[0]
    return {
        "backbone": model.backbone.name,
        "num_classes": model.num_classes,
        "hidden_dim": model.hidden_dim,
        "num_heads": first_dec.cross_attn.num_heads,
        "enc_layers": len(model.transformer.encoder),
        "dec_layers": len(model.transformer.decoder),
        "dim_feedforward": first_dec.linear1.out_features,
        "dropout": first_dec.dropout.p,
        "decoder_self_attn": first_dec.self_attn is not None,
        "input_proj": not isinstance(model.input_proj, nn.Identity),
    }


def model_spec(model: Query2Label, label_names: list[str], image_size: int) -> ModelSpec:
    """Describe ``model`` (architecture + its ``data_config`` mean/std) with its labels and input size."""
    model = _unwrap(model)
    if not isinstance(image_size, int) or image_size < 1:
        raise PackagingError(f"image_size must be a positive int, got {image_size!r}")
    dc = model.data_config
    return ModelSpec(
        architecture=architecture_of(model),
        label_names=list(label_names),
        image_size=image_size,
        mean=tuple(float(v) for v in dc["mean"]),
        std=tuple(float(v) for v in dc["std"]),
    )


def build_from_spec(spec: ModelSpec, state_dict: dict[str, torch.Tensor], source: str) -> Query2Label:
    """A Query2Label in eval mode with ``spec``'s architecture, the given weights and the stored mean/std."""
    try:
        model = Query2Label(**spec.architecture, pretrained=False)
    except (TypeError, ValueError) as e:
        raise PackagingError(
            f"{source}: cannot build the architecture {spec.architecture} with q2l {q2l.__version__} "
            f"(packaged with q2l {spec.q2l_version}): {e}"
        ) from None
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise PackagingError(
            f"{source}: the weights do not fit the architecture (packaged with q2l {spec.q2l_version}, "
            f"loading with {q2l.__version__}): {str(e).splitlines()[0]}"
        ) from None
    # the backbone was built without pretrained weights, whose data_config may differ from training's
    model.data_config = {**model.data_config, "mean": spec.mean, "std": spec.std}
    return model.eval()


def _decode_bytes(data: bytes, name: str) -> torch.Tensor:
    """Encoded image bytes → uint8 [3, H, W] RGB, with the same decoders as ``decode_rgb`` uses for files."""
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_image

    if not data:
        raise BadImageError(name, "empty image (0 bytes)")
    try:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as e:
        first_error = str(e).rsplit(", ", 1)[-1]
    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadImageError(name, f"not a readable image ({first_error}; PIL: {e})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def decode_source(source: str | bytes, name: str) -> torch.Tensor:
    """One pyfunc input → uint8 [3, H, W]: raw bytes, an existing file path, or base64 (or a data URI)."""
    if isinstance(source, (bytes, bytearray)):
        return _decode_bytes(bytes(source), name)
    if not isinstance(source, str):
        raise BadImageError(name, f"expected a file path or base64 text, got {type(source).__name__}")
    text = source.strip()
    if len(text) < 4096 and Path(text).is_file():
        return decode_rgb(text)
    payload = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise BadImageError(
            name, f"neither an existing file nor base64-encoded image bytes: {shown!r}"
        ) from None
    try:
        return _decode_bytes(data, name)
    except BadImageError as e:
        reason = f"not an existing file, and its base64 bytes are no image: {e.reason}"
        raise BadImageError(name, reason) from None


class Predictor:
    """A loaded model with its labels and preprocessing: decode → squish resize → normalise → sigmoid.

    The same steps as training's evaluation (``MultiLabelDataset`` + ``Engine``), so scores agree.
    """

    def __init__(self, model: Query2Label, spec: ModelSpec, device: str | torch.device | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.spec = spec
        # the engine's fused normalisation: (x − 255·mean) / (255·std)
        self._mean255 = torch.tensor(spec.mean, device=self.device).view(1, -1, 1, 1) * 255
        self._std255 = torch.tensor(spec.std, device=self.device).view(1, -1, 1, 1) * 255

    @property
    def label_names(self) -> list[str]:
        """Label names in the order of the probability columns."""
        return self.spec.label_names

    @property
    def image_size(self) -> int:
        """Side of the square input in pixels."""
        return self.spec.image_size

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """A decoded uint8 [3, H, W] image → uint8 [3, S, S] (squish resize, as in training)."""
        return squish_resize(image, self.image_size)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, S, S] → normalised float on the model's device."""
        if images.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images, got {images.dtype}")
        return images.to(self.device).float().sub_(self._mean255).div_(self._std255)

    @torch.no_grad()
    def predict_tensors(self, images: torch.Tensor) -> np.ndarray:
        """Probabilities float32 [B, K] for preprocessed uint8 images [B, 3, S, S]."""
        return torch.sigmoid(self.model(self.normalize(images)).float()).cpu().numpy()

    def predict_sources(self, sources: list, batch_size: int = 32) -> np.ndarray:
        """Probabilities [N, K] for file paths / base64 text / bytes; a bad input raises ``BadImageError``."""
        probs = []
        for start in range(0, len(sources), batch_size):
            chunk = sources[start : start + batch_size]
            images = [self.preprocess(decode_source(s, f"row {start + i}")) for i, s in enumerate(chunk)]
            probs.append(self.predict_tensors(torch.stack(images)))
        if not probs:
            return np.zeros((0, len(self.label_names)), dtype=np.float32)
        return np.concatenate(probs)

    def predict_paths(
        self, paths: list[str | Path], batch_size: int = 32, progress: bool = False
    ) -> tuple[np.ndarray, list[tuple[str, str]]]:
        """Probabilities [N, K] for image files, row i for ``paths[i]``; unreadable files are NaN rows.

        Returns ``(probs, failures)`` with ``failures`` a list of ``(path, reason)``. ``progress`` shows a
        tqdm bar (on stderr).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        probs = np.full((len(paths), len(self.label_names)), math.nan, dtype=np.float32)
        failures: list[tuple[str, str]] = []
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(paths), unit="img", desc="predict")
        for start in range(0, len(paths), batch_size):
            rows, images = [], []
            for i in range(start, min(start + batch_size, len(paths))):
                try:
                    images.append(self.preprocess(decode_rgb(paths[i])))
                    rows.append(i)
                except BadImageError as e:
                    failures.append((str(paths[i]), e.reason))
            if images:
                probs[rows] = self.predict_tensors(torch.stack(images))
            if bar is not None:
                bar.update(min(batch_size, len(paths) - start))
        if bar is not None:
            bar.close()
        return probs, failures


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


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Write ``model``'s state dict (CPU, contiguous) as safetensors."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in _unwrap(model).state_dict().items()}
    save_file(state, str(path), metadata={"format": "q2l", "q2l_version": q2l.__version__})


def log_model(
    model: Query2Label,
    *,
    label_names: list[str],
    image_size: int,
    name: str = "model",
    input_example: Any = None,
    registered_model_name: str | None = None,
):
    """Log ``model`` into the active MLflow run as a models-from-code pyfunc; returns MLflow's ``ModelInfo``.

    Input: a DataFrame column ``image`` of file paths or base64-encoded image bytes (any number of rows);
    output: a DataFrame of probabilities with one column per label name. ``input_example`` defaults to a
    one-row DataFrame with a base64 PNG. ``registered_model_name`` also registers a new model version.
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


def predictor_from_files(
    spec_path: str | Path, weights_path: str | Path, device: str | torch.device | None = None
) -> Predictor:
    """A ``Predictor`` from ``q2l_model.json`` and ``weights.safetensors`` (no code from the store runs)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    spec = ModelSpec.from_json(spec_path)
    try:
        state = load_file(str(weights_path))
    except (OSError, SafetensorError) as e:
        raise PackagingError(f"{weights_path}: not a readable safetensors file ({e})") from None
    return Predictor(build_from_spec(spec, state, str(weights_path)), spec, device)


def _predictor_from_model_dir(path: Path, source: str, device) -> Predictor:
    """A ``Predictor`` from a downloaded MLflow model folder, via its artifacts (the code file is not run)."""
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
    return predictor_from_files(path / spec_rel, path / weights_rel, device)


def checkpoint_spec(state: dict[str, Any], source: str) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """The ``ModelSpec`` and weights of a training checkpoint's best-weights file (``best.pt``).

    The file holds ``model`` (state dict), ``label_names``, ``image_size`` and ``config`` (resolved YAML).
    mean/std are those training normalised with: the backbone's data config as ``build_model`` resolves it.
    """
    import yaml

    from q2l.config import ConfigError, config_from_dict
    from q2l.models import build_model

    missing = [k for k in ("model", "label_names", "image_size", "config") if k not in state]
    if missing:
        raise PackagingError(
            f"{source}: not a best-weights checkpoint (missing {', '.join(missing)}); "
            f"pass the Ray checkpoint folder or its {BEST_CHECKPOINT_FILE}"
        )
    try:
        cfg = config_from_dict(yaml.safe_load(state["config"]), f"{source} (config)")
    except (ConfigError, yaml.YAMLError) as e:
        raise PackagingError(f"{source}: its config cannot be read: {e}") from None
    label_names = list(state["label_names"])
    # Built without weights only to read the architecture; mean/std follow the checkpoint's config (the
    # offline Lite0 package weights normalise with 0.5, other backbones with timm's pretrained config).
    probe = build_model(
        dataclasses.replace(cfg.model, pretrained=False, pretrained_path=None), len(label_names)
    )
    mean, std = probe.data_config["mean"], probe.data_config["std"]
    if cfg.model.pretrained and not cfg.model.pretrained_path and cfg.model.backbone == LITE0:
        mean = std = (0.5, 0.5, 0.5)
    spec = ModelSpec(
        architecture=architecture_of(probe),
        label_names=label_names,
        image_size=int(state["image_size"]),
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
    )
    return spec, state["model"]


def _predictor_from_checkpoint(path: Path, device) -> Predictor:
    """A ``Predictor`` from a checkpoint file or a Ray checkpoint folder holding ``best.pt``."""
    from q2l.engine.checkpoint import load_checkpoint

    file = path / BEST_CHECKPOINT_FILE if path.is_dir() else path
    try:
        state = load_checkpoint(file)
    except (FileNotFoundError, ValueError) as e:
        raise PackagingError(str(e)) from None
    if not isinstance(state, dict):
        raise PackagingError(f"{file}: not a q2l checkpoint (expected a dict, got {type(state).__name__})")
    spec, weights = checkpoint_spec(state, str(file))
    return Predictor(build_from_spec(spec, weights, str(file)), spec, device)


def load_predictor(uri: str, device: str | torch.device | None = None) -> Predictor:
    """Load a packaged model or a training checkpoint for prediction.

    ``uri``: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN_ID/model`` (any MLflow artifact
    URI of a model logged by ``log_model``), a local MLflow model folder, or a local checkpoint file / Ray
    checkpoint folder written by training. MLflow URIs use the current tracking/registry URI.
    """
    local = Path(uri).expanduser()
    if "://" not in uri and ":/" not in uri[:10]:
        if not local.exists():
            raise PackagingError(f"{uri}: no such file or folder (and not a models:/ or runs:/ URI)")
        if (local / "MLmodel").is_file():
            return _predictor_from_model_dir(local, uri, device)
        return _predictor_from_checkpoint(local, device)
    import mlflow
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="q2l-model-") as tmp:
        try:
            path = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        except MlflowException as e:
            raise PackagingError(f"{uri}: cannot be resolved: {e.message}") from None
        except OSError as e:
            raise PackagingError(f"{uri}: cannot be downloaded: {e}") from None
        if path.is_file() or not (path / "MLmodel").is_file():
            # e.g. runs:/ID/checkpoints/best.pt, the best weights a training run logs
            return _predictor_from_checkpoint(path, device)
        return _predictor_from_model_dir(path, uri, device)
