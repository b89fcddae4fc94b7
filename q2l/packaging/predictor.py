"""A loaded model with its labels and preprocessing (``Predictor``), and building one from checked parts.

The preprocessing is training's evaluation path (``MultiLabelDataset`` + ``Engine``): decode (with the pixel
budget checked from the header first) → squish resize → uint8 → normalise on the device → sigmoid.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

import q2l
from q2l.data.images import DEFAULT_MAX_PIXELS, BadImageError, decode_rgb
from q2l.data.transforms import squish_resize
from q2l.engine.normalize import Uint8Normalizer
from q2l.models import Query2Label
from q2l.packaging.inputs import decode_source
from q2l.packaging.spec import ModelSpec, PackagingError, unwrap


class Predictor:
    """A loaded model with its labels and preprocessing: decode → squish resize → normalise → sigmoid.

    The same steps as training's evaluation, so scores agree. ``max_pixels`` is the decoding budget
    (``data.max_image_pixels``; its default without a config): a larger image is refused before decoding.
    """

    def __init__(
        self,
        model: Query2Label,
        spec: ModelSpec,
        device: str | torch.device | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.spec = spec
        self.max_pixels = max_pixels
        self._normalize = Uint8Normalizer(spec.mean, spec.std, self.device)  # as the engine does

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
        return self._normalize(images.to(self.device))

    @torch.no_grad()
    def predict_tensors(self, images: torch.Tensor) -> np.ndarray:
        """Probabilities float32 [B, K] for preprocessed uint8 images [B, 3, S, S]."""
        return torch.sigmoid(self.model(self.normalize(images)).float()).cpu().numpy()

    def predict_sources(self, sources: list, batch_size: int = 32) -> np.ndarray:
        """Probabilities [N, K] for file paths / base64 text / bytes; a bad input raises ``BadImageError``."""
        probs = []
        for start in range(0, len(sources), batch_size):
            chunk = sources[start : start + batch_size]
            images = [
                self.preprocess(decode_source(s, f"row {start + i}", self.max_pixels))
                for i, s in enumerate(chunk)
            ]
            probs.append(self.predict_tensors(torch.stack(images)))
        if not probs:
            return np.zeros((0, len(self.label_names)), dtype=np.float32)
        return np.concatenate(probs)

    def predict_paths(
        self, paths: list[str | Path], batch_size: int = 32, progress: bool = False
    ) -> tuple[np.ndarray, list[tuple[str, str]]]:
        """Probabilities [N, K] for image files, row i for ``paths[i]``; unreadable files are NaN rows.

        Returns ``(probs, failures)`` with ``failures`` a list of ``(path, reason)``; an image over the pixel
        budget is one of them. ``progress`` shows a tqdm bar (on stderr).
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
                    images.append(self.preprocess(decode_rgb(paths[i], self.max_pixels)))
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


def build_from_spec(spec: ModelSpec, state_dict: dict[str, torch.Tensor], source: str) -> Query2Label:
    """A Query2Label in eval mode with ``spec``'s architecture, the given weights and the stored mean/std.

    ``spec`` is checked when it is made (``ModelSpec``), so the architecture is within the config's ranges.
    """
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


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Write ``model``'s state dict (CPU, contiguous) as safetensors."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    save_file(state, str(path), metadata={"format": "q2l", "q2l_version": q2l.__version__})


def predictor_from_files(
    spec_path: str | Path,
    weights_path: str | Path,
    device: str | torch.device | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Predictor:
    """A ``Predictor`` from ``q2l_model.json`` and ``weights.safetensors`` (no code from the store runs).

    The description is checked completely before the weights are read or the model is built.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    spec = ModelSpec.from_json(spec_path)
    try:
        state = load_file(str(weights_path))
    except (OSError, SafetensorError) as e:
        raise PackagingError(f"{weights_path}: not a readable safetensors file ({e})") from None
    return Predictor(build_from_spec(spec, state, str(weights_path)), spec, device, max_pixels)
