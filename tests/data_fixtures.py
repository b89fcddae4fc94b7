"""Helpers for the data tests: real, tiny image files and annotation files in each supported layout."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def image_array(seed: int, h: int = 40, w: int = 48) -> np.ndarray:
    """A smooth random RGB image (JPEG-friendly, so decoded pixels stay close to the array)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(base).resize((w, h), Image.BILINEAR))


def write_jpeg(path: Path, seed: int = 0, h: int = 40, w: int = 48, mode: str = "RGB") -> Path:
    """Write a real JPEG (``mode`` RGB, L or CMYK)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_array(seed, h, w)).convert(mode).save(path, quality=92)
    return path


def write_png_alpha(path: Path, seed: int = 0) -> Path:
    """Write an RGBA PNG with a half-transparent alpha channel."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = image_array(seed)
    alpha = np.full(rgb.shape[:2] + (1,), 128, dtype=np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha], axis=2), "RGBA").save(path)
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    """Cut a file to ``keep`` of its bytes."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


# (image file, category ids) per image; ids have gaps; image 4 has no annotation
COCO_IMAGES = [("a.jpg", [3, 7]), ("b.jpg", [1]), ("c.jpg", [7, 7, 12]), ("d.jpg", [])]
COCO_CATEGORIES = [(12, "zebra"), (1, "apple"), (3, "cat"), (7, "dog")]  # unsorted on purpose


def coco_doc(images=COCO_IMAGES, categories=COCO_CATEGORIES) -> dict:
    """A COCO instances document for ``images`` [(file name, [category ids])]."""
    doc = {"images": [], "annotations": [], "categories": [{"id": c, "name": n} for c, n in categories]}
    for i, (name, cats) in enumerate(images, start=1):
        doc["images"].append({"id": i * 10, "file_name": name, "width": 48, "height": 40})
        for c in cats:
            doc["annotations"].append(
                {
                    "id": len(doc["annotations"]) + 1,
                    "image_id": i * 10,
                    "category_id": c,
                    "bbox": [1, 1, 5, 5],
                }
            )
    return doc


def make_coco_set(root: Path, train=COCO_IMAGES, test=None, categories=COCO_CATEGORIES) -> Path:
    """COCO 2014 layout under ``root`` with real JPEGs; returns ``root``."""
    test = test if test is not None else train
    for split, images in (("train", train), ("val", test)):
        for k, (name, _) in enumerate(images):
            write_jpeg(root / f"{split}2014" / name, seed=k)
        ann = root / "annotations" / f"instances_{split}2014.json"
        ann.parent.mkdir(parents=True, exist_ok=True)
        ann.write_text(json.dumps(coco_doc(images, categories), indent=1))
    return root


def make_voc_set(root: Path) -> Path:
    """A VOC2007-layout folder: 3 trainval + 2 test images; one difficult-only object."""
    objs = {
        "000001": [("dog", 0), ("person", 0)],
        "000002": [("cat", 0), ("dog", 1)],  # dog is difficult here
        "000003": [("person", 0)],
        "000004": [("cat", 0)],
        "000005": [("dog", 0), ("cat", 1)],
    }
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n000002\n000003\n")
    (root / "ImageSets" / "Main" / "test.txt").write_text("000004\n000005\n")
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    for k, (image_id, objects) in enumerate(objs.items()):
        body = "".join(f"<object><name>{n}</name><difficult>{d}</difficult></object>" for n, d in objects)
        xml = f"<annotation><filename>{image_id}.jpg</filename>{body}</annotation>"
        (root / "Annotations" / f"{image_id}.xml").write_text(xml)
        write_jpeg(root / "JPEGImages" / f"{image_id}.jpg", seed=k)
    return root


def write_bomb_png(path: Path, width: int = 16000, height: int = 16000) -> Path:
    """A constant grayscale PNG of ``width`` × ``height`` pixels, small on disk (~275 kB for 16000²).

    Written row by row through a streaming zlib compressor, so that making it never holds more than one
    row of pixels (decoding it to RGB takes 3·width·height bytes: 768 MB for 16000²).
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = b"\0" + b"\x80" * width  # filter type 0, then one gray byte per pixel
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    return path


def claim_jpeg_size(path: Path, width: int, height: int) -> Path:
    """Rewrite the frame size in a baseline JPEG's SOF0 header; the scan data stays the original image's."""
    data = bytearray(path.read_bytes())
    with Image.open(path) as im:
        w, h = im.size
    at = data.find(b"\xff\xc0")
    assert at > 0 and struct.unpack(">HBHH", data[at + 2 : at + 9])[1:] == (8, h, w), "no baseline SOF0"
    data[at + 5 : at + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))
    return path
