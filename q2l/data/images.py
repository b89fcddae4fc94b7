"""Image decoding to uint8 RGB tensors, and the bad-image policy.

``torchvision.io.decode_image`` (libjpeg-turbo / libpng on the file's bytes) is used first: it is faster
than PIL and converts grayscale, palette, CMYK JPEGs and PNGs with alpha to RGB itself. Anything it cannot
read is retried with PIL (``convert("RGB")``) so that rarer formats (BMP, TIFF …) still load; a file that
neither can decode, or that is missing, empty or truncated, raises ``BadImageError`` naming the path.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

log = logging.getLogger(__name__)

# torchvision 0.29 marks its codecs deprecated in favour of torchcodec (not a dependency here); the
# decoders still work and are what we measure, so silence only that message.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")


class BadImageError(Exception):
    """An image that cannot be used: missing, empty, truncated or not an image. ``path`` names the file."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def read_bytes(path: str | Path) -> torch.Tensor:
    """The file's bytes as uint8 ``[N]``, or ``BadImageError`` if it is missing, unreadable or empty."""
    try:
        data = np.fromfile(path, dtype=np.uint8)  # one read straight into the buffer the decoders take
    except FileNotFoundError:
        raise BadImageError(path, "file not found") from None
    except OSError as e:
        raise BadImageError(path, f"cannot read file ({e.strerror or e})") from None
    if data.size == 0:
        raise BadImageError(path, "empty file (0 bytes)")
    return torch.from_numpy(data)


def decode_rgb(path: str | Path) -> torch.Tensor:
    """Read ``path`` into a uint8 tensor ``[3, H, W]`` (RGB) or raise ``BadImageError``."""
    data = read_bytes(path)
    try:
        return decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError as e:
        first_error = str(e).rsplit(", ", 1)[-1]
    if "truncated" in first_error.lower():
        # libjpeg-turbo is right about truncation; PIL would only fail again, more slowly
        raise BadImageError(path, f"truncated image ({first_error})")
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadImageError(path, f"not a readable image ({first_error}; PIL: {e})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class BadImagePolicy:
    """``error``: raise ``BadImageError``; ``skip``: log each bad path once and return None."""

    def __init__(self, mode: str):
        if mode not in ("error", "skip"):
            raise ValueError(f"data.on_bad_image = {mode!r} must be 'error' or 'skip'")
        self.mode = mode
        self._logged: set[str] = set()

    def handle(self, err: BadImageError) -> None:
        """Re-raise under ``error``; under ``skip`` log the path the first time this process meets it."""
        if self.mode == "error":
            raise err
        if err.path not in self._logged:
            self._logged.add(err.path)
            log.warning("skipping bad image %s", err)
