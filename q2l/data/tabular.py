"""Custom data sets as CSV or JSONL lists of image path + labels (NUS-WIDE and the like).

CSV (``.csv``), one image per line, in one of two shapes:

* ``image,labels`` (header optional): labels separated by ``|`` (``cat|dog``) or a JSON list
  (``["cat","dog"]``, quoted as CSV requires);
* wide header ``image,<name1>,<name2>,…``: one column per label, ``1`` positive, ``0`` negative, ``-1`` or
  empty unknown (partial labels); the header fixes the label names and their order.

JSONL (any other suffix, e.g. ``.jsonl``): one object per line ``{"image": path, "labels": [names]}``; an
optional first line ``{"label_names": [...]}`` fixes the names. Relative image paths are resolved against
``root``.

Declared names (a wide header, a ``label_names`` line) are the label set, and a label outside it is an
error naming the file and line. Without declared names the label set is the sorted labels of the training
file: a label only the test file uses is an error (a class no image teaches), and so is a label written as
an index (all digits, e.g. ``99``) among labels written as names; neither silently becomes a new class.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import numpy as np

from q2l.data.table import DataError, LabelTable, raise_first

_IMAGE_COLUMNS = {"image", "path", "file", "file_name", "filename", "image_path"}
_LABEL_COLUMNS = {"labels", "label", "tags"}

Row = tuple[str, dict[str, int], int]  # (image, {label: 1|0|-1}, line number)


def _split_labels(text: str, where: str) -> list[str]:
    text = text.strip()
    if text.startswith("["):
        try:
            labels = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: malformed JSON label list at column {e.colno}: {e.msg}") from None
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise DataError(f"{where}: the label list must be a JSON list of strings")
        return [x.strip() for x in labels if x.strip()]
    return [x.strip() for x in text.split("|") if x.strip()]


def _csv_row(cells: list[str], names: list[str] | None, where: str) -> dict[str, int]:
    if names is not None:  # wide format
        if len(cells) != len(names) + 1:
            raise DataError(
                f"{where}: expected {len(names) + 1} columns (image + one per label), got {len(cells)}"
            )
        values = {}
        for name, cell in zip(names, cells[1:], strict=True):
            cell = cell.strip()
            if cell not in ("1", "0", "-1", ""):
                raise DataError(f"{where}: label {name!r} value {cell!r} must be 1, 0, -1 or empty")
            values[name] = int(cell) if cell else -1
        return values
    if len(cells) not in (1, 2):
        raise DataError(
            f"{where}: expected 2 columns (image, labels as a|b or a JSON list), got {len(cells)}"
        )
    return dict.fromkeys(_split_labels(cells[1], where) if len(cells) == 2 else [], 1)


def _read_csv(path: Path, text: str, errors: list[str] | None) -> tuple[list[Row], list[str] | None]:
    lines = list(csv.reader(io.StringIO(text)))
    rows: list[Row] = []
    names: list[str] | None = None
    start = 0
    if lines and lines[0] and lines[0][0].strip().lower() in _IMAGE_COLUMNS:
        header = [c.strip() for c in lines[0]]
        start = 1
        if len(header) > 2 or (len(header) == 2 and header[1].lower() not in _LABEL_COLUMNS):
            names = header[1:]
            if len(set(names)) != len(names):
                raise DataError(f"{path}:1: duplicate label names in the header")
    for lineno, cells in enumerate(lines[start:], start=start + 1):
        if not cells or not any(c.strip() for c in cells):
            continue
        try:
            rows.append((cells[0].strip(), _csv_row(cells, names, f"{path}:{lineno}"), lineno))
        except DataError as e:
            if errors is None:
                raise
            errors.append(str(e))
    return rows, names


def _jsonl_row(line: str, where: str) -> tuple[str | None, dict | list]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON at column {e.colno}: {e.msg}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: each line must be a JSON object")
    if "label_names" in obj:
        names = obj["label_names"]
        if not isinstance(names, list) or not all(isinstance(x, str) for x in names):
            raise DataError(f"{where}: label_names must be a list of strings")
        return None, names
    image = next((obj[k] for k in ("image", "path", "file_name") if k in obj), None)
    labels = obj.get("labels", [])
    if (
        not isinstance(image, str)
        or not isinstance(labels, list)
        or not all(isinstance(x, str) for x in labels)
    ):
        raise DataError(f'{where}: expected {{"image": path, "labels": [names]}}')
    return image, dict.fromkeys(labels, 1)


def _read_jsonl(path: Path, text: str, errors: list[str] | None) -> tuple[list[Row], list[str] | None]:
    rows: list[Row] = []
    names: list[str] | None = None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            image, content = _jsonl_row(line, where)
            if image is None and (rows or names is not None):
                raise DataError(f"{where}: label_names must be on the first line")
        except DataError as e:
            if errors is None:
                raise
            errors.append(str(e))
            continue
        if image is None:
            names = list(content)
        else:
            rows.append((image, dict(content), lineno))
    return rows, names


def read_rows(path: str | Path, errors: list[str] | None = None) -> tuple[list[Row], list[str] | None, bytes]:
    """Parse a CSV/JSONL file: rows, declared label names (or None), and the raw bytes.

    A malformed line raises ``DataError`` (``path:line: what``), or, when ``errors`` is a list, is recorded
    there and skipped so that every bad line can be listed.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: label file not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    reader = _read_csv if path.suffix.lower() == ".csv" else _read_jsonl
    rows, names = reader(path, text, errors)
    return rows, names, data


def label_set(files: list[tuple[Path, list[Row]]], declared: list[str] | None) -> tuple[list[str], list[str]]:
    """The label names of ``files`` (training file first) and every label outside them, as messages.

    ``declared``: the names the files declare, or None (then the training file's labels are the set).
    """
    if declared is not None:
        names, outside = list(declared), "is not among the declared label names"
    else:
        train_file, train_rows = files[0]
        names = sorted({n for _, labels, _ in train_rows for n in labels})
        outside = f"does not occur in the training file {train_file}"
    known = set(names)
    index_like = {n for n in names if n.isdigit()}
    mixed = declared is None and index_like and len(index_like) < len(names)
    problems = []
    for file, rows in files:
        for _, labels, lineno in rows:
            for n in labels:
                if n not in known:
                    hint = " (labels are written as names, not as indices)" if n.isdigit() else ""
                    problems.append(f"{file}:{lineno}: label {n!r} {outside}{hint}")
                elif mixed and n in index_like:
                    problems.append(
                        f"{file}:{lineno}: label {n!r} looks like a class index while the other labels are"
                        " names; write its name, or declare the label set (a header of label columns)"
                    )
    return names, problems


def load_tabular(
    train_file: str | Path,
    test_file: str | Path | None,
    root: str | Path,
    *,
    include_unannotated: bool = True,
) -> tuple[LabelTable, LabelTable]:
    """Train and test tables from CSV/JSONL files (``data.train_file``, ``data.test_file``)."""
    if test_file is None:
        raise DataError("data.test_file is required for data.format = 'csv' (the evaluation set)")
    root = Path(root)
    parsed = [read_rows(p) for p in (train_file, test_file)]
    declared = [names for _, names, _ in parsed if names is not None]
    if declared and any(d != declared[0] for d in declared):
        raise DataError(f"{train_file} and {test_file} declare different label names")
    files = [(Path(f), rows) for f, (rows, _, _) in zip((train_file, test_file), parsed, strict=True)]
    label_names, problems = label_set(files, declared[0] if declared else None)
    raise_first(problems)
    index_of = {n: k for k, n in enumerate(label_names)}
    h = hashlib.sha256()
    for _, _, data in parsed:
        h.update(hashlib.sha256(data).digest())
    tables = []
    for _, rows in files:
        keys, targets = [], []
        for image, labels, _ in rows:
            row = np.zeros(len(label_names), dtype=np.int8)
            for name, value in labels.items():
                row[index_of[name]] = value
            if not include_unannotated and not (row == 1).any():
                continue
            keys.append(image)
            targets.append(row)
        paths = [image if Path(image).is_absolute() else str(root / image) for image in keys]
        matrix = np.stack(targets) if targets else np.zeros((0, len(label_names)), dtype=np.int8)
        tables.append(LabelTable(keys, paths, matrix, label_names, h.hexdigest()))
    return tables[0], tables[1]
