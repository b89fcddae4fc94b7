"""COCO-format annotations (COCO 2014 or any ``instances_*.json``) → a multi-label ``LabelTable``.

Category ids (which have gaps, 1..90 in COCO) map to contiguous indices in sorted id order; label names come
from the categories. Every listed image is kept, annotated or not (``include_unannotated``). Labels come from
the annotations through pycocotools' index, never from decoding images, and are cached under the label
cache directory keyed by the annotation file's sha256.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from q2l.data.table import (
    DataError,
    LabelTable,
    file_sha256,
    load_cached_table,
    raise_first,
    save_cached_table,
)

_CACHE_VERSION = "coco-v1"


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a syntax error becomes ``DataError`` naming the file, line and column."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{p}: annotation file not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text (byte {e.start}): {e.reason}") from None


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _where(path: str | Path, kind: str, i: int, item: Any) -> str:
    ann_id = item.get("id") if kind == "annotations" and isinstance(item, dict) else None
    return f"{path}: {kind}[{i}]" + (f" (id {ann_id!r})" if ann_id is not None else "")


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


# what each entry must hold: key → (check, what it must be)
_FIELDS: dict[str, dict[str, tuple[Any, str]]] = {
    "images": {
        "id": (_is_id, "an integer"),
        "file_name": (lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string"),
    },
    "categories": {"id": (_is_id, "an integer"), "name": (lambda v: isinstance(v, str), "a string")},
    "annotations": {"image_id": (_is_id, "an integer"), "category_id": (_is_id, "an integer")},
}


def check_coco_top_level(d: Any, path: str | Path) -> None:
    """Raise ``DataError`` unless ``d`` is an object with lists of images, categories (and annotations)."""
    if not isinstance(d, dict):
        raise DataError(f"{path}: top level must be a JSON object with images/annotations/categories")
    for key in ("images", "categories"):
        if not isinstance(d.get(key), list):
            raise DataError(f"{path}: missing or non-list key {key!r}")
    if not isinstance(d.get("annotations", []), list):
        raise DataError(f"{path}: key 'annotations' must be a list")


def _well_formed(kind: str, item: Any) -> bool:
    fields = _FIELDS[kind]
    return isinstance(item, dict) and all(k in item and ok(item[k]) for k, (ok, _) in fields.items())


def coco_entry_problems(d: dict, path: str | Path) -> list[str]:
    """Entries of images/categories/annotations that are not objects or lack or mistype an id or name."""
    problems = []
    for kind, fields in _FIELDS.items():
        for i, item in enumerate(d.get(kind, [])):
            if not isinstance(item, dict):
                problems.append(f"{_where(path, kind, i, item)}: must be a JSON object, got {_shown(item)}")
                continue
            for key, (ok, must_be) in fields.items():
                if key not in item:
                    problems.append(f"{_where(path, kind, i, item)}: missing {key!r}")
                elif not ok(item[key]):
                    problems.append(
                        f"{_where(path, kind, i, item)}: {key} must be {must_be}, got {_shown(item[key])}"
                    )
    return problems


def coco_reference_problems(d: dict, path: str | Path) -> list[str]:
    """Annotations pointing at an unknown category or image id, and duplicate ids, as messages.

    Entries that ``coco_entry_problems`` reports are left out here (their ids cannot be compared).
    """
    categories = [c for c in d["categories"] if _well_formed("categories", c)]
    images = [im for im in d["images"] if _well_formed("images", im)]
    cat_ids = {c["id"] for c in categories}
    img_ids = [im["id"] for im in images]
    problems = []
    if len(set(img_ids)) != len(img_ids):
        problems.append(f"{path}: duplicate image ids")
    if len(cat_ids) != len(categories):
        problems.append(f"{path}: duplicate category ids")
    names = [c["name"] for c in categories]
    if len(set(names)) != len(names):
        problems.append(f"{path}: duplicate category names (each category becomes one label)")
    img_set = set(img_ids)
    for i, ann in enumerate(d.get("annotations", [])):
        if not _well_formed("annotations", ann):
            continue
        if ann["category_id"] not in cat_ids:
            problems.append(
                f"{_where(path, 'annotations', i, ann)}: unknown category_id {ann['category_id']!r}"
            )
        if ann["image_id"] not in img_set:
            problems.append(f"{_where(path, 'annotations', i, ann)}: missing image_id {ann['image_id']!r}")
    return problems


def check_coco_structure(d: Any, path: str | Path) -> None:
    """Raise ``DataError`` unless ``d`` has the COCO keys, shapes and id types this reader relies on."""
    check_coco_top_level(d, path)
    raise_first(coco_entry_problems(d, path))


def _parse(path: Path, include_unannotated: bool) -> tuple[list[str], np.ndarray, list[str]]:
    d = read_json(path)
    check_coco_structure(d, path)
    raise_first(coco_reference_problems(d, path))
    d.setdefault("annotations", [])
    # imported here so that the loaders and transforms import where pycocotools is absent (GPU images)
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = d
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    cat_ids = sorted(coco.getCatIds())
    index_of = {cid: k for k, cid in enumerate(cat_ids)}
    names = [coco.cats[cid]["name"] for cid in cat_ids]
    keys, rows = [], []
    for img_id in sorted(coco.imgs):
        anns = coco.imgToAnns.get(img_id, [])
        if not anns and not include_unannotated:
            continue
        row = np.zeros(len(cat_ids), dtype=np.int8)
        row[[index_of[a["category_id"]] for a in anns]] = 1
        keys.append(coco.imgs[img_id]["file_name"])
        rows.append(row)
    targets = np.stack(rows) if rows else np.zeros((0, len(cat_ids)), dtype=np.int8)
    return keys, targets, names


def load_coco(
    annotations: str | Path,
    images: str | Path,
    *,
    include_unannotated: bool = True,
    cache_dir: Path | None = None,
) -> LabelTable:
    """Read a COCO instances file into a ``LabelTable`` whose paths are ``images/<file_name>``."""
    annotations = Path(annotations)
    if not annotations.is_file():
        raise DataError(f"{annotations}: annotation file not found")
    content_hash = file_sha256(annotations)
    cached = None
    cache_file = None
    if cache_dir is not None:
        tag = f"{_CACHE_VERSION}-{int(include_unannotated)}-{content_hash[:32]}"
        cache_file = cache_dir / f"labels-{tag}.npz"
        cached = load_cached_table(cache_file)
    if cached is None:
        cached = _parse(annotations, include_unannotated)
        if cache_file is not None:
            save_cached_table(cache_file, *cached)
    keys, targets, names = cached
    images = Path(images)
    return LabelTable(
        keys=keys,
        paths=[str(images / k) for k in keys],
        targets=targets,
        label_names=names,
        content_hash=content_hash,
    )
