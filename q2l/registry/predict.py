"""``q2l predict``: label images with a packaged model or a training checkpoint.

Inputs are image files and folders (searched recursively for image suffixes). Images are scored in batches;
unreadable ones are listed on stderr (and in the JSON document), never fatal. Output formats: ``table``
(one line per image with its selected labels), ``json`` (every probability), ``csv`` (one column per label).
``--explain DIR`` writes, per image, the cross-attention map of each selected label over the image (PNG).
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from q2l.data.images import DEFAULT_MAX_PIXELS, BadImageError, decode_rgb
from q2l.explain import attention_maps, predicted_labels, save_attention_figure
from q2l.packaging import PackagingError, Predictor, load_predictor
from q2l.tracking.store import quiet_artifact_downloads

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
FORMATS = ("table", "json", "csv")
DEFAULT_THRESHOLD = 0.5


class PredictUsageError(Exception):
    """Bad arguments: no input image, unknown format, bad top-k/threshold/batch size (exit 2)."""


@dataclass
class Predictions:
    """Probabilities for ``paths`` (NaN rows where unreadable) and the unreadable ``(path, reason)`` list."""

    paths: list[str]
    probs: np.ndarray
    failures: list[tuple[str, str]]
    label_names: list[str]

    def ok_rows(self) -> list[int]:
        """Indices of the images that were read."""
        return [i for i in range(len(self.paths)) if not np.isnan(self.probs[i]).any()]


def collect_images(inputs: list[str | Path]) -> tuple[list[str], bool]:
    """Files given directly (any suffix) plus image files found under folders, sorted per folder.

    Returns ``(paths, any_folder)``. A missing input is kept so that it is reported as unreadable.
    """
    paths: list[str] = []
    any_folder = False
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            any_folder = True
            paths += sorted(
                str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
            )
        else:
            paths.append(str(p))
    return paths, any_folder


def selection(top_k: int | None, threshold: float | None) -> tuple[int | None, float | None]:
    """Effective (top_k, threshold): threshold 0.5 unless only ``top_k`` is given (then top-k regardless)."""
    if top_k is not None and top_k < 1:
        raise PredictUsageError(f"--top-k must be >= 1, got {top_k}")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise PredictUsageError(f"--threshold must be in [0, 1], got {threshold}")
    if threshold is None and top_k is None:
        threshold = DEFAULT_THRESHOLD
    return top_k, threshold


def write_table(preds: Predictions, top_k: int | None, threshold: float | None, out: TextIO) -> None:
    """One line per readable image: path, then ``label probability`` pairs, most likely first."""
    rows = preds.ok_rows()
    width = min(60, max((len(preds.paths[i]) for i in rows), default=5))
    for i in rows:
        chosen = predicted_labels(preds.probs[i], threshold, top_k)
        text = ", ".join(f"{preds.label_names[k]} {preds.probs[i][k]:.3f}" for k in chosen)
        out.write(f"{preds.paths[i]:<{width}}  {text or f'(no label >= {threshold:.2f})'}\n")


def write_json(
    preds: Predictions, top_k: int | None, threshold: float | None, model: str, out: TextIO
) -> None:
    """One JSON document: selected labels and all probabilities per image, and the unreadable images."""
    items = []
    for i in preds.ok_rows():
        chosen = predicted_labels(preds.probs[i], threshold, top_k)
        items.append(
            {
                "image": preds.paths[i],
                "labels": [
                    {"label": preds.label_names[k], "probability": float(preds.probs[i][k])} for k in chosen
                ],
                "probabilities": {
                    n: float(p) for n, p in zip(preds.label_names, preds.probs[i], strict=True)
                },
            }
        )
    doc = {
        "model": model,
        "top_k": top_k,
        "threshold": threshold,
        "predictions": items,
        "unreadable": [{"image": p, "error": r} for p, r in preds.failures],
    }
    out.write(json.dumps(doc, indent=2) + "\n")


def write_csv(preds: Predictions, top_k: int | None, threshold: float | None, out: TextIO) -> None:
    """Header ``image,predicted,<label>...``; ``predicted`` is the selected labels joined by ``;``."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["image", "predicted", *preds.label_names])
    for i in preds.ok_rows():
        chosen = predicted_labels(preds.probs[i], threshold, top_k)
        writer.writerow(
            [
                preds.paths[i],
                ";".join(preds.label_names[k] for k in chosen),
                *(f"{p:.6f}" for p in preds.probs[i]),
            ]
        )


def _unique_stem(path: str, used: set[str]) -> str:
    stem = Path(path).stem or "image"
    name, n = stem, 1
    while name in used:
        n += 1
        name = f"{stem}_{n}"
    used.add(name)
    return name


def write_explanations(
    predictor: Predictor,
    preds: Predictions,
    out_dir: str | Path,
    top_k: int | None,
    threshold: float | None,
    batch_size: int,
) -> list[Path]:
    """Per readable image ``<out_dir>/<stem>.png``: the image, one attention overlay per selected label."""
    rows = preds.ok_rows()
    used: set[str] = set()
    written = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        originals = []
        for i in chunk:
            try:
                originals.append(decode_rgb(preds.paths[i], predictor.max_pixels))
            except BadImageError:  # changed on disk since it was scored: it stays in the predictions
                originals.append(None)
        kept = [(i, img) for i, img in zip(chunk, originals, strict=True) if img is not None]
        if not kept:
            continue
        probs, maps = attention_maps(
            predictor.model, torch.stack([predictor.preprocess(img) for _, img in kept])
        )
        for j, (i, img) in enumerate(kept):
            labels = predicted_labels(probs[j], threshold, top_k)
            target = Path(out_dir) / f"{_unique_stem(preds.paths[i], used)}.png"
            written.append(
                save_attention_figure(
                    img,
                    maps[j],
                    probs[j],
                    predictor.label_names,
                    labels,
                    target,
                    title=Path(preds.paths[i]).name,
                )
            )
    return written


def run_predict(
    model: str,
    inputs: list[str | Path],
    *,
    top_k: int | None = None,
    threshold: float | None = None,
    fmt: str = "table",
    explain_dir: str | Path | None = None,
    batch_size: int = 32,
    tracking_uri: str | None = None,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """``q2l predict``: predict and print; returns the exit code.

    0: at least one image was labelled (unreadable ones, and those over ``max_image_pixels``, are listed on
    ``err``); 1: none could be read; 2: usage error (bad argument, no image found, model not loadable or its
    files failing their checks), message on ``err``. ``tracking_uri`` is where ``models:/`` and ``runs:/``
    URIs are looked up (MLflow's current URI if None).
    """
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        top_k, threshold = selection(top_k, threshold)
        paths, any_folder = _checked_inputs(inputs, fmt, batch_size)
        with quiet_artifact_downloads():
            predictor = load_predictor(model, tracking_uri=tracking_uri, max_pixels=max_image_pixels)
    except (PredictUsageError, PackagingError) as e:
        err.write(f"error: {e}\n")
        return 2
    probs, failures = predictor.predict_paths(
        paths, batch_size=batch_size, progress=any_folder and err.isatty()
    )
    preds = Predictions(paths, probs, failures, predictor.label_names)
    return _report(predictor, preds, model, top_k, threshold, fmt, explain_dir, batch_size, out, err)


def _checked_inputs(inputs: list[str | Path], fmt: str, batch_size: int) -> tuple[list[str], bool]:
    """The image paths (``collect_images``) once the arguments are usable; ``PredictUsageError`` otherwise."""
    if fmt not in FORMATS:
        raise PredictUsageError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if batch_size < 1:
        raise PredictUsageError(f"--batch-size must be >= 1, got {batch_size}")
    paths, any_folder = collect_images(inputs)
    if not paths:
        raise PredictUsageError(f"no image found in {', '.join(map(str, inputs)) or 'the arguments'}")
    return paths, any_folder


def _report(
    predictor: Predictor,
    preds: Predictions,
    model: str,
    top_k,
    threshold,
    fmt,
    explain_dir,
    batch_size,
    out: TextIO,
    err: TextIO,
) -> int:
    """Write the predictions, the unreadable images and (``explain_dir``) attention maps; the exit code."""
    failures = preds.failures
    if fmt == "table":
        write_table(preds, top_k, threshold, out)
    elif fmt == "json":
        write_json(preds, top_k, threshold, model, out)
    else:
        write_csv(preds, top_k, threshold, out)
    for path, reason in failures:
        err.write(f"unreadable: {path}: {reason}\n")
    if explain_dir is not None:
        written = write_explanations(predictor, preds, explain_dir, top_k, threshold, batch_size)
        err.write(f"attention maps: {len(written)} figure(s) in {explain_dir}\n")
    read = len(preds.paths) - len(failures)
    err.write(f"{read} image(s) labelled, {len(failures)} unreadable\n")
    return 0 if read > 0 else 1
