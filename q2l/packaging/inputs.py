"""What a packaged model accepts as input, and the limits a request is held to before anything is decoded.

One input is raw bytes, an existing file path, or base64 text (optionally a ``data:`` URI). A request (the
rows of one pyfunc call, e.g. one HTTP request to ``mlflow models serve``) holds at most
``MAX_IMAGES_PER_REQUEST`` rows of at most ``MAX_INPUT_CHARS`` characters each, and every image is checked
against the pixel budget (``data.max_image_pixels``'s default) from its header before it is decoded.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from pathlib import Path

import torch

from q2l.data.images import DEFAULT_MAX_PIXELS, BadImageError, decode_rgb, decode_rgb_bytes

# rows per request: each is decoded and resized in turn, so this bounds the work one request can ask for
MAX_IMAGES_PER_REQUEST = 64
# one row's text: base64 of an image of up to 24 MiB (a 40-megapixel JPEG is well under that)
MAX_INPUT_CHARS = 32 * 2**20
# a string this short may be a file path; base64 of any real image is longer
_MAX_PATH_CHARS = 4096


class RequestTooLargeError(ValueError):
    """A request over ``MAX_IMAGES_PER_REQUEST`` rows or with a row over ``MAX_INPUT_CHARS``."""


def check_request(
    sources: Sequence, max_images: int = MAX_IMAGES_PER_REQUEST, max_chars: int = MAX_INPUT_CHARS
) -> None:
    """Refuse (``RequestTooLargeError``) a request with too many rows or a row too long, naming the row."""
    if len(sources) > max_images:
        raise RequestTooLargeError(
            f"{len(sources)} images in one request; at most {max_images} (send several requests)"
        )
    for i, source in enumerate(sources):
        if isinstance(source, (str, bytes, bytearray)) and len(source) > max_chars:
            raise RequestTooLargeError(f"row {i}: {len(source)} characters; at most {max_chars} per image")


def decode_source(source: str | bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """One input → uint8 [3, H, W]: raw bytes, an existing file path, or base64 (or a data URI).

    An image over ``max_pixels`` (read from its header) is a ``BadImageError``, as is anything unreadable.
    """
    if isinstance(source, (bytes, bytearray)):
        return decode_rgb_bytes(bytes(source), name, max_pixels)
    if not isinstance(source, str):
        raise BadImageError(name, f"expected a file path or base64 text, got {type(source).__name__}")
    text = source.strip()
    if len(text) < _MAX_PATH_CHARS and Path(text).is_file():
        return decode_rgb(text, max_pixels)
    payload = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise BadImageError(
            name, f"neither an existing file nor base64-encoded image bytes: {shown!r}"
        ) from None
    try:
        return decode_rgb_bytes(data, name, max_pixels)
    except BadImageError as e:
        reason = f"not an existing file; as base64 image bytes: {e.reason}"
        raise BadImageError(name, reason) from None
