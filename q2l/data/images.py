"""Image decoding to uint8 RGB tensors, the decoding limit, and the bad-image policy.

``torchvision.io.decode_image`` (libjpeg-turbo / libpng on the file's bytes) is used first: it is faster
than PIL and converts grayscale, palette, CMYK JPEGs and PNGs with alpha to RGB itself. Anything it cannot
read is retried with PIL (``convert("RGB")``) so that rarer formats (BMP, TIFF …) still load; a file that
neither can decode, or that is missing, empty or truncated, raises ``BadImageError`` naming the path.

Before any pixel is decoded, the width and height are read from the header (JPEG and PNG parsed here, other
formats through PIL's lazy ``Image.open``) and an image over ``max_pixels`` (``data.max_image_pixels``) is a
``BadImageError``: a small, highly compressed file can otherwise expand to gigabytes (a 250 kB PNG of
16000 × 16000 pixels decodes to 768 MB of RGB).
"""

from __future__ import annotations

import io
import logging
import re
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

from q2l.config import DataConfig

log = logging.getLogger(__name__)

# torchvision 0.29 marks its codecs deprecated in favour of torchcodec (not a dependency here); the
# decoders still work and are what we measure, so silence only that message.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")

DEFAULT_MAX_PIXELS: int = DataConfig.max_image_pixels  # the config default, for callers without a config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# start-of-frame markers (they carry the frame size); C4 (DHT), C8 (JPG) and CC (DAC) share the range
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# markers without a length field: TEM, RST0-7, SOI
_JPEG_STANDALONE = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})


class BadImageError(Exception):
    """An image that cannot be used: missing, empty, truncated or not an image. ``path`` names the file."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):
        # rebuilt from (path, reason): Ray pickles a worker's exception to the driver
        return (type(self), (self.path, self.reason))


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


def _as_buffer(data: bytes | bytearray | torch.Tensor) -> memoryview:
    """A zero-copy byte view of encoded image bytes (a uint8 tensor or a bytes-like object)."""
    if isinstance(data, torch.Tensor):
        return memoryview(data.contiguous().numpy()).cast("B")
    return memoryview(data).cast("B")


def _png_size(buf: memoryview) -> tuple[int, int] | None:
    # the first chunk must be IHDR: length 13, type, width, height (big-endian)
    if len(buf) < 24 or bytes(buf[12:16]) != b"IHDR":
        return None
    width, height = struct.unpack(">II", buf[16:24])
    return width, height


def _jpeg_size(buf: memoryview) -> tuple[int, int] | None:
    # walk the marker segments up to the first start-of-frame; anything unusual → None (PIL decides)
    i, n = 2, len(buf)
    while i + 1 < n:
        if buf[i] != 0xFF:
            return None
        marker = buf[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _JPEG_STANDALONE:
            i += 2
            continue
        if marker in (0xD9, 0xDA) or i + 4 > n:  # end of image / scan before any frame header
            return None
        if marker in _JPEG_SOF:
            if i + 9 > n:
                return None
            height, width = struct.unpack(">HH", buf[i + 5 : i + 9])
            return (width, height) if width and height else None
        i += 2 + ((buf[i + 2] << 8) | buf[i + 3])
    return None


def _pil_size(buf: memoryview, name: str, max_pixels: int) -> tuple[int, int]:
    try:
        with warnings.catch_warnings():
            # PIL warns above its own MAX_IMAGE_PIXELS; the limit that applies here is ours
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(buf)) as im:  # reads the header only
                return im.size
    except Image.DecompressionBombError as e:
        # PIL refuses at twice its MAX_IMAGE_PIXELS before giving the size; its message has the count
        found = re.search(r"\((\d+) pixels\)", str(e))
        pixels = int(found.group(1)) if found else None
        if pixels is None or pixels > max_pixels:
            size = f"{pixels} pixels" if pixels is not None else "unknown size"
            raise BadImageError(name, _limit_message(size, max_pixels)) from None
        raise BadImageError(name, f"image of {pixels} pixels is beyond what PIL decodes ({e})") from None
    except Image.UnidentifiedImageError:
        raise BadImageError(name, "not a readable image (unknown format)") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise BadImageError(name, f"not a readable image ({e})") from None


def _limit_message(size: str, max_pixels: int) -> str:
    return f"image of {size} exceeds the limit of {max_pixels} (data.max_image_pixels)"


def check_image_size(
    data: bytes | bytearray | torch.Tensor, name: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[int, int]:
    """``(width, height)`` from the header of encoded image bytes, without decoding any pixel.

    Raises ``BadImageError(name, ...)`` when ``width × height`` exceeds ``max_pixels`` or no image header can
    be read. JPEG and PNG headers are parsed here; other formats are opened lazily with PIL.
    """
    buf = _as_buffer(data)
    head = bytes(buf[:8])
    size = None
    if head == PNG_MAGIC:
        size = _png_size(buf)
    elif head[:3] == b"\xff\xd8\xff":
        size = _jpeg_size(buf)
    if size is None:
        size = _pil_size(buf, str(name), max_pixels)
    width, height = size
    if width * height > max_pixels:
        raise BadImageError(name, _limit_message(f"{width} x {height} = {width * height} pixels", max_pixels))
    return width, height


def decode_rgb_bytes(
    data: bytes | bytearray | torch.Tensor, name: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS
) -> torch.Tensor:
    """Encoded image bytes → uint8 ``[3, H, W]`` RGB, or ``BadImageError`` naming ``name``.

    The size is checked from the header first (``check_image_size``), then decoded with torchvision,
    falling back to PIL for formats torchvision does not read.
    """
    if len(data) == 0:
        raise BadImageError(name, "empty image (0 bytes)")
    check_image_size(data, name, max_pixels)
    tensor = data if isinstance(data, torch.Tensor) else torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        return decode_image(tensor, mode=ImageReadMode.RGB)
    except RuntimeError as e:
        first_error = str(e).rsplit(", ", 1)[-1]
    if "truncated" in first_error.lower():
        # libjpeg-turbo is right about truncation; PIL would only fail again, more slowly
        raise BadImageError(name, f"truncated image ({first_error})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked above
            with Image.open(io.BytesIO(_as_buffer(data))) as im:
                arr = np.asarray(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadImageError(name, f"not a readable image ({first_error}; PIL: {e})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def decode_rgb(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Read ``path`` into a uint8 tensor ``[3, H, W]`` (RGB) or raise ``BadImageError`` naming it."""
    return decode_rgb_bytes(read_bytes(path), path, max_pixels)


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
