"""Pascal VOC 2007 layout → ``LabelTable``s for ``trainval`` (training) and ``test``.

``<root>/ImageSets/Main/{trainval,test}.txt`` list the image ids, ``<root>/Annotations/<id>.xml`` the objects,
``<root>/JPEGImages/<id>.jpg`` the images. Objects marked difficult are not positives unless
``include_difficult``. Label names are the sorted union over both splits (VOC's 20 classes are alphabetical,
so this is the standard order).
"""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from q2l.data.table import DataError, LabelTable


def read_split_ids(root: Path, split: str) -> list[str]:
    """Image ids of ``ImageSets/Main/<split>.txt`` (first token of each non-empty line)."""
    path = root / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        raise DataError(f"{path}: VOC split file not found (expected the VOC2007 folder as data.root)")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def parse_voc_xml(path: Path) -> tuple[list[tuple[str, bool]], bytes]:
    """``[(class name, difficult)]`` of one annotation file, and its bytes (for hashing)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file not found") from None
    try:
        tree = ET.fromstring(data)
    except ET.ParseError as e:
        line, col = e.position
        what = str(e).split(":")[0]  # "mismatched tag: line 3, column 2" → "mismatched tag"
        raise DataError(f"{path}: malformed XML at line {line}, column {col + 1}: {what}") from None
    objects = []
    for obj in tree.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise DataError(f"{path}: an <object> has no <name>")
        objects.append((name, (obj.findtext("difficult") or "0").strip() == "1"))
    return objects, data


def load_voc(root: str | Path, *, include_difficult: bool = False) -> tuple[LabelTable, LabelTable]:
    """The ``trainval`` and ``test`` tables of a VOC2007 folder, with the same label names."""
    root = Path(root)
    splits = {name: read_split_ids(root, name) for name in ("trainval", "test")}
    parsed: dict[str, list[list[tuple[str, bool]]]] = {}
    h = hashlib.sha256()
    for name, ids in splits.items():
        h.update(f"{name}:{','.join(ids)}\n".encode())
        parsed[name] = []
        for image_id in ids:
            objects, data = parse_voc_xml(root / "Annotations" / f"{image_id}.xml")
            h.update(data)
            parsed[name].append(objects)
    label_names = sorted({n for objs in parsed.values() for per_image in objs for n, _ in per_image})
    if not label_names:
        raise DataError(f"{root}: no labelled objects in any VOC annotation")
    index_of = {n: k for k, n in enumerate(label_names)}
    tables = []
    for name, ids in splits.items():
        targets = np.zeros((len(ids), len(label_names)), dtype=np.int8)
        for row, objects in enumerate(parsed[name]):
            for cls, difficult in objects:
                if include_difficult or not difficult:
                    targets[row, index_of[cls]] = 1
        keys = [f"{i}.jpg" for i in ids]
        paths = [str(root / "JPEGImages" / k) for k in keys]
        tables.append(LabelTable(keys, paths, targets, label_names, h.hexdigest()))
    return tables[0], tables[1]
