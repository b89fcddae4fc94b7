"""``q2l data validate``: scan a whole data set and list every problem instead of stopping at the first.

Checks, per format: annotation syntax (JSON position, XML line, CSV/JSONL line), structure, annotations that
point at an unknown category or a missing image, and every image file (missing, empty, truncated, not an
image) by decoding it fully with the same decoder training uses.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from q2l.data.coco import check_coco_structure, coco_reference_problems, read_json
from q2l.data.images import BadImageError, decode_rgb
from q2l.data.table import DataError
from q2l.data.tabular import read_rows
from q2l.data.voc import parse_voc_xml, read_split_ids


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


def _check_images(paths: list[str]) -> list[Problem]:
    def check(path: str) -> Problem | None:
        try:
            decode_rgb(path)
        except BadImageError as e:
            return Problem(e.path, e.reason)
        return None

    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        results = list(tqdm(pool.map(check, paths), total=len(paths), desc="images", unit="img", leave=False))
    return [p for p in results if p is not None]


def _validate_coco(annotations: Path, images: Path) -> list[Problem]:
    try:
        d = read_json(annotations)
        check_coco_structure(d, annotations)
    except DataError as e:
        return [Problem.from_message(str(e))]
    problems = [Problem.from_message(m) for m in coco_reference_problems(d, annotations)]
    if not d["images"]:
        problems.append(Problem(str(annotations), "no images listed (empty data set)"))
    if not d["categories"]:
        problems.append(Problem(str(annotations), "no categories"))
    return problems + _check_images([str(images / im["file_name"]) for im in d["images"]])


def _validate_voc(root: Path) -> list[Problem]:
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
    return problems + _check_images(sorted(set(paths)))


def _validate_tabular(file: Path, images: Path) -> list[Problem]:
    errors: list[str] = []
    try:
        rows, names, _ = read_rows(file, errors)
    except DataError as e:
        return [Problem.from_message(str(e))]
    problems = [Problem.from_message(m) for m in errors]
    if names is not None:
        known = set(names)
        for _, labels, lineno in rows:
            problems += [
                Problem(f"{file}:{lineno}", f"label {n!r} is not declared") for n in labels if n not in known
            ]
    if not rows:
        problems.append(Problem(str(file), "no images listed (empty data set)"))
    paths = [image if Path(image).is_absolute() else str(images / image) for image, _, _ in rows]
    return problems + _check_images(paths)


def validate_dataset(
    format: str = "coco",
    annotations: str | Path | None = None,
    images: str | Path | None = None,
    root: str | Path | None = None,
) -> list[Problem]:
    """Every problem of a data set (an empty list when it is fine).

    coco: ``annotations`` + ``images``, or ``root`` alone for the COCO 2014 layout (both splits).
    voc: ``root`` = the VOC2007 folder. csv: ``annotations`` = the CSV/JSONL file, ``images`` = the folder
    relative image paths are resolved against (default: the file's folder).
    """
    if format == "coco":
        if annotations is not None:
            if images is None:
                return [
                    Problem(str(annotations), "--images (the image folder) is required with --annotations")
                ]
            return _validate_coco(Path(annotations), Path(images))
        if root is None:
            return [
                Problem("<arguments>", "give --annotations and --images, or --root for the COCO 2014 layout")
            ]
        root = Path(root)
        problems = []
        for split in ("train", "val"):
            problems += _validate_coco(
                root / "annotations" / f"instances_{split}2014.json", root / f"{split}2014"
            )
        return problems
    if format == "voc":
        if root is None:
            return [Problem("<arguments>", "--root (the VOC2007 folder) is required for --format voc")]
        return _validate_voc(Path(root))
    if format == "csv":
        if annotations is None:
            return [Problem("<arguments>", "--annotations (the CSV/JSONL file) is required for --format csv")]
        file = Path(annotations)
        return _validate_tabular(file, Path(images) if images is not None else Path(root or file.parent))
    return [Problem("<arguments>", f"--format {format!r} must be one of coco, voc, csv")]
