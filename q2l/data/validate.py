"""``q2l data validate``: scan a whole data set and list every problem instead of stopping at the first.

Checks, per format: annotation syntax (JSON position, XML line, CSV/JSONL line), structure and id types,
annotations that point at an unknown category or a missing image, labels outside the label set, and every
image file (missing, empty, truncated, not an image, over ``data.max_image_pixels``) by decoding it fully
with the same decoder training uses. The problems are the ones ``build_datasets`` raises as ``DataError``.
"""

from __future__ import annotations

import os
import typing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from q2l.config import DataConfig
from q2l.data.coco import check_coco_top_level, coco_entry_problems, coco_reference_problems, read_json
from q2l.data.images import DEFAULT_MAX_PIXELS, BadImageError, decode_rgb
from q2l.data.table import DataError
from q2l.data.tabular import label_set, read_rows
from q2l.data.voc import parse_voc_xml, read_split_ids

FORMATS: tuple[str, ...] = typing.get_args(typing.get_type_hints(DataConfig)["format"])  # coco voc csv


class ArgumentsError(ValueError):
    """``validate_dataset`` was called with an unknown format or without the paths the format needs."""


@dataclass(frozen=True)
class Problem:
    """One problem: the file (with ``:line`` where it applies) and what is wrong."""

    path: str
    what: str

    def __str__(self) -> str:
        return f"{self.path}: {self.what}"

    @classmethod
    def from_message(cls, message: str) -> Problem:
        """From a ``"path: what"`` message (as ``DataError`` s are written)."""
        path, _, what = message.partition(": ")
        return cls(path, what or message)


def _check_images(paths: list[str], max_pixels: int) -> list[Problem]:
    def check(path: str) -> Problem | None:
        try:
            decode_rgb(path, max_pixels)
        except BadImageError as e:
            return Problem(e.path, e.reason)
        return None

    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        results = list(tqdm(pool.map(check, paths), total=len(paths), desc="images", unit="img", leave=False))
    return [p for p in results if p is not None]


def _validate_coco(annotations: Path, images: Path, max_pixels: int) -> list[Problem]:
    try:
        d = read_json(annotations)
        check_coco_top_level(d, annotations)
    except DataError as e:
        return [Problem.from_message(str(e))]
    messages = coco_entry_problems(d, annotations) + coco_reference_problems(d, annotations)
    problems = [Problem.from_message(m) for m in messages]
    if not d["images"]:
        problems.append(Problem(str(annotations), "no images listed (empty data set)"))
    if not d["categories"]:
        problems.append(Problem(str(annotations), "no categories"))
    files = [im.get("file_name") for im in d["images"] if isinstance(im, dict)]
    return problems + _check_images([str(images / f) for f in files if isinstance(f, str) and f], max_pixels)


def _validate_voc(root: Path, max_pixels: int) -> list[Problem]:
    problems: list[Problem] = []
    paths: list[str] = []
    for split in ("trainval", "test"):
        try:
            ids = read_split_ids(root, split)
        except DataError as e:
            problems.append(Problem.from_message(str(e)))
            continue
        if not ids:
            problems.append(Problem(str(root / "ImageSets" / "Main" / f"{split}.txt"), "no images listed"))
        for image_id in ids:
            try:
                parse_voc_xml(root / "Annotations" / f"{image_id}.xml")
            except DataError as e:
                problems.append(Problem.from_message(str(e)))
            paths.append(str(root / "JPEGImages" / f"{image_id}.jpg"))
    return problems + _check_images(sorted(set(paths)), max_pixels)


def _validate_tabular(file: Path, images: Path, max_pixels: int) -> list[Problem]:
    errors: list[str] = []
    try:
        rows, names, _ = read_rows(file, errors)
    except DataError as e:
        return [Problem.from_message(str(e))]
    _, outside = label_set([(file, rows)], names)
    problems = [Problem.from_message(m) for m in errors + outside]
    if not rows:
        problems.append(Problem(str(file), "no images listed (empty data set)"))
    paths = [image if Path(image).is_absolute() else str(images / image) for image, _, _ in rows]
    return problems + _check_images(list(dict.fromkeys(paths)), max_pixels)  # each file once


def validate_dataset(
    format: str = "coco",
    annotations: str | Path | None = None,
    images: str | Path | None = None,
    root: str | Path | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[Problem]:
    """Every problem of a data set (an empty list when it is fine).

    coco: ``annotations`` + ``images``, or ``root`` alone for the COCO 2014 layout (both splits).
    voc: ``root`` = the VOC2007 folder. csv: ``annotations`` = the CSV/JSONL file, ``images`` = the folder
    relative image paths are resolved against (default: the file's folder). ``max_pixels``: the decoding
    limit (``data.max_image_pixels``). Raises ``ArgumentsError`` for an unknown format or missing paths.
    """
    if format not in FORMATS:
        raise ArgumentsError(f"--format {format!r} must be one of {', '.join(FORMATS)}")
    if format == "coco":
        if annotations is not None:
            if images is None:
                raise ArgumentsError("--images (the image folder) is required with --annotations")
            return _validate_coco(Path(annotations), Path(images), max_pixels)
        if root is None:
            raise ArgumentsError("give --annotations and --images, or --root for the COCO 2014 layout")
        root = Path(root)
        problems = []
        for split in ("train", "val"):
            problems += _validate_coco(
                root / "annotations" / f"instances_{split}2014.json", root / f"{split}2014", max_pixels
            )
        return problems
    if format == "voc":
        if root is None:
            raise ArgumentsError("--root (the VOC2007 folder) is required for --format voc")
        return _validate_voc(Path(root), max_pixels)
    if annotations is None:
        raise ArgumentsError("--annotations (the CSV/JSONL file) is required for --format csv")
    file = Path(annotations)
    return _validate_tabular(
        file, Path(images) if images is not None else Path(root or file.parent), max_pixels
    )
