"""A training checkpoint's best weights (``best.pt``, ``q2l/packaging/checkpoint.py``) as a ``Predictor``.

Every field the file holds is checked before any model is built: the state dict (names → tensors), the
label names, the image size, and the resolved config (the config's own validation: every key, type and
range, so an architecture out of ``ModelConfig``'s ranges is refused, not allocated).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from q2l.data.images import DEFAULT_MAX_PIXELS
from q2l.packaging import checkpoint
from q2l.packaging.predictor import Predictor, build_from_spec
from q2l.packaging.spec import (
    ModelSpec,
    PackagingError,
    architecture_of,
    check_image_size,
    check_label_names,
)

_REQUIRED = ("model", "label_names", "image_size", "config")


def _checked_config(state: dict[str, Any], source: str):
    import timm
    import yaml

    from q2l.config import ConfigError, config_from_dict

    text = state["config"]
    if not isinstance(text, str):
        raise PackagingError(f"{source}: config must be the resolved config as YAML text")
    try:
        cfg = config_from_dict(yaml.safe_load(text), f"{source} (config)")
    except (ConfigError, yaml.YAMLError) as e:
        raise PackagingError(f"{source}: its config cannot be read: {e}") from None
    if not timm.is_model(cfg.model.backbone):
        raise PackagingError(f"{source}: config model.backbone = {cfg.model.backbone!r} is not a timm model")
    return cfg


def _checked_weights(value: Any, source: str) -> dict[str, torch.Tensor]:
    if not isinstance(value, dict) or not value:
        raise PackagingError(f"{source}: model must be a state dict (parameter name → tensor)")
    bad = next(
        (k for k, v in value.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None
    )
    if bad is not None:
        raise PackagingError(f"{source}: model[{bad!r}] is not a named tensor")
    return value


def checkpoint_spec(state: Any, source: str) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """The checked ``ModelSpec`` and weights of a training checkpoint's best-weights file (``best.pt``).

    The file holds ``model`` (state dict), ``label_names``, ``image_size`` and ``config`` (resolved YAML).
    mean/std are those training normalised with (``q2l.models.pretrained.weights_data_config``).
    """
    from q2l.models import build_model
    from q2l.models.pretrained import weights_data_config

    if not isinstance(state, dict):
        raise PackagingError(f"{source}: not a q2l checkpoint (expected a dict, got {type(state).__name__})")
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise PackagingError(
            f"{source}: not a best-weights checkpoint (missing {', '.join(missing)}); "
            f"pass the Ray checkpoint folder or its {checkpoint.BEST_FILE}"
        )
    weights = _checked_weights(state["model"], source)
    label_names = check_label_names(state["label_names"], source)
    image_size = check_image_size(state["image_size"], source)
    cfg = _checked_config(state, source)
    # built without weights only to read the architecture; its size is bounded by the checked config
    m = cfg.model
    probe = build_model(dataclasses.replace(m, pretrained=False, pretrained_path=None), len(label_names))
    data_config = weights_data_config(
        probe.backbone.body, m.backbone, pretrained=m.pretrained, pretrained_path=m.pretrained_path
    )
    spec = ModelSpec(
        architecture=architecture_of(probe),
        label_names=label_names,
        image_size=image_size,
        mean=data_config["mean"],
        std=data_config["std"],
    )
    return spec, weights


def predictor_from_checkpoint(
    path: str | Path, device: str | torch.device | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Predictor:
    """A ``Predictor`` from a checkpoint file or a Ray checkpoint folder holding ``best.pt``."""
    file = checkpoint.best_path(path)
    try:
        state = checkpoint.read_best(file)
    except (FileNotFoundError, ValueError) as e:
        raise PackagingError(str(e)) from None
    spec, weights = checkpoint_spec(state, str(file))
    return Predictor(build_from_spec(spec, weights, str(file)), spec, device, max_pixels)
