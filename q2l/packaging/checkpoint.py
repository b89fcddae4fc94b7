"""The training checkpoint format: one writer and one reader for a checkpoint folder and its best weights.

A checkpoint folder (what rank 0 reports to Ray Train every epoch) holds three files:

- ``engine.pt``: the Engine's exact-resume state (model, EMA, optimiser, scheduler, scaler, RNG, epoch).
- ``best.pt``: the best weights so far (``model`` state dict, ``source`` "model" or "ema", 1-based ``epoch``,
  ``holdout_map``) with what a predictor needs to rebuild them: ``label_names``, ``image_size`` and the
  resolved ``config`` as YAML. The training run also logs this file as an MLflow artifact.
- ``meta.json``: the MLflow run id, the epoch, its held-out mAP, the label names, the data fingerprint, and
  ``final`` (the final report) once the run has finished.

Everything is written with ``torch.save`` and read back with ``weights_only=True``: a checkpoint from shared
storage can hold tensors and plain containers, never code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from q2l.engine.checkpoint import load_checkpoint, save_checkpoint

ENGINE_FILE = "engine.pt"
BEST_FILE = "best.pt"
META_FILE = "meta.json"


def best_file_content(
    best: dict[str, Any], label_names: list[str], image_size: int, config_yaml: str
) -> dict:
    """What ``best.pt`` holds: the best weights (``best`` from the Engine) and how to rebuild the model."""
    return {**best, "label_names": list(label_names), "image_size": int(image_size), "config": config_yaml}


def save_best(content: dict[str, Any], path: str | Path) -> Path:
    """Write ``best.pt`` content (``best_file_content``) to ``path``."""
    save_checkpoint(content, path)
    return Path(path)


def write_folder(folder: str | Path, engine_state: dict, best: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write a checkpoint folder: engine state, ``best.pt`` content, and meta."""
    folder = Path(folder)
    save_checkpoint(engine_state, folder / ENGINE_FILE)
    save_best(best, folder / BEST_FILE)
    (folder / META_FILE).write_text(json.dumps(meta))


def read_meta(folder: str | Path) -> dict[str, Any]:
    """A checkpoint folder's ``meta.json``."""
    return json.loads((Path(folder) / META_FILE).read_text())


def write_meta(folder: str | Path, meta: dict[str, Any]) -> None:
    """Replace a checkpoint folder's ``meta.json``."""
    (Path(folder) / META_FILE).write_text(json.dumps(meta))


def copy_folder(source: str | Path, target: str | Path) -> None:
    """Copy a checkpoint folder's three files from ``source`` into ``target``."""
    for name in (ENGINE_FILE, BEST_FILE, META_FILE):
        shutil.copy2(Path(source) / name, Path(target) / name)


def read_folder(folder: str | Path) -> tuple[dict, dict, dict]:
    """(engine state, ``best.pt`` content, meta) of a checkpoint folder."""
    folder = Path(folder)
    return load_checkpoint(folder / ENGINE_FILE), load_checkpoint(folder / BEST_FILE), read_meta(folder)


def read_best(path: str | Path) -> Any:
    """``best.pt`` content from the file itself or from a checkpoint folder holding it (weights only)."""
    path = Path(path)
    return load_checkpoint(path / BEST_FILE if path.is_dir() else path)


def best_path(path: str | Path) -> Path:
    """The ``best.pt`` file that ``path`` (the file or its folder) names."""
    path = Path(path)
    return path / BEST_FILE if path.is_dir() else path
