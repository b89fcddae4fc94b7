"""Helpers for the model, packaging and training tests: a tiny Query2Label, its reference output, config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode

from q2l.models import Query2Label

# the tiny transformer of every test model: d = 32, 2 heads, one encoder and one decoder layer, ff 64
TINY_ARCH = {"hidden_dim": 32, "num_heads": 2, "enc_layers": 1, "dec_layers": 1, "dim_feedforward": 64}


def tiny_model(seed: int, num_classes: int, hidden_dim: int = 32) -> Query2Label:
    """A tiny Query2Label (timm ``test_efficientnet``, ``TINY_ARCH``) seeded with ``seed``, in eval mode."""
    torch.manual_seed(seed)
    arch = {**TINY_ARCH, "hidden_dim": hidden_dim}
    return Query2Label(backbone="test_efficientnet", num_classes=num_classes, **arch).eval()


@torch.no_grad()
def reference_probs(model: Query2Label, paths: list[Path], size: int) -> np.ndarray:
    """The torch model's sigmoid output, with the preprocessing written out here (no q2l data code).

    PIL decode to RGB; a "squish" resize to ``size`` x ``size`` ignoring the aspect ratio, bilinear with
    antialiasing on the uint8 image (torchvision's v2 kernel, which rounds uint8 as training's resize does;
    an image already that size is left as it is); then ``(x/255 - mean)/std`` with the model's mean and std.
    """
    images = torch.stack([_squished(p, size) for p in paths]).float() / 255
    mean = torch.tensor(model.data_config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.data_config["std"]).view(1, 3, 1, 1)
    return torch.sigmoid(model((images - mean) / std)).numpy()


def _squished(path: Path, size: int) -> torch.Tensor:
    with Image.open(path) as im:
        rgb = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
    if rgb.shape[-2:] == (size, size):
        return rgb
    return F.resize(rgb, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)


def tiny_config_dict(data_root: Path, **sections: dict) -> dict:
    """The raw tiny plumbing config over ``data_root``; each of ``sections`` updates (or adds) that section.

    A small ``resnet18`` (``pretrained=False``, ``TINY_ARCH``) at 32 px, 2 epochs of batch 8, no loader
    workers and no RandAugment; where results go (``ray``, ``mlflow``) is the caller's to say.
    """
    raw = {
        "data": {
            "root": str(data_root),
            "image_size": 32,
            "holdout_fraction": 0.25,
            "num_workers": 0,
            "randaugment": False,
        },
        "model": {"backbone": "resnet18", "pretrained": False, **TINY_ARCH},
        "optim": {"lr": 1e-3},
        "train": {"epochs": 2, "batch_size": 8, "ema_decay": 0.9, "early_stop_patience": None},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw
