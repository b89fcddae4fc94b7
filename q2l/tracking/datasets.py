"""The data splits a run used, as MLflow dataset inputs (the runs table's Dataset column, the run's Datasets).

Each split is one MLflow dataset entity: name ``<data folder>-<split>``, a digest derived from the splits'
data fingerprint (``q2l/data/build.py``) and the split name, the source ``data.root``, a schema (an image
path and its label names) and a profile (images, labels, positives per label). Entities are identified by
name + digest, so a promotion evaluation that logs the same test split (``log_split``) points at the very
dataset the training runs were scored on.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlflow.data.meta_dataset import MetaDataset

# the split's role, as MLflow's ``mlflow.data.context`` input tag (shown next to the dataset in the UI)
CONTEXTS = {"train": "training", "holdout": "validation", "test": "test"}


def split_digest(fingerprint: str, split: str) -> str:
    """The split's digest: 16 hex characters of sha256 over the data fingerprint and the split name."""
    return hashlib.sha256(f"{fingerprint}:{split}".encode()).hexdigest()[:16]


def split_name(root: str, split: str) -> str:
    """The split's dataset name: the data folder's name and the split (``demo-test``)."""
    folder = Path(str(root).rstrip("/")).name or str(root)
    return f"{folder}-{split}"


class ImageSplit(MetaDataset):
    """An MLflow dataset that describes one image split (metadata only: the images stay where they are)."""

    def __init__(self, *, source, name: str, digest: str, schema, profile: dict[str, Any]):
        self._profile = profile
        super().__init__(source=source, name=name, digest=digest, schema=schema)

    @property
    def profile(self) -> dict[str, Any]:
        """Images, labels and positives per label of the split."""
        return self._profile

    def to_dict(self) -> dict[str, str]:
        """MetaDataset's fields plus the profile (as JSON text, which MLflow stores and the UI shows)."""
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def _source(root: str):
    """``data.root`` as an MLflow dataset source (a local folder becomes its absolute path)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    if "://" not in root:
        root = str(Path(root).expanduser().resolve())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MLflow warns that two of its source classes claim a local path
        return resolve_dataset_source(root)


def _schema():
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    return Schema([ColSpec(DataType.string, "image"), ColSpec(Array(DataType.string), "labels")])


def image_split(split: str, dataset, label_names: Sequence[str], fingerprint: str, root: str) -> ImageSplit:
    """The MLflow dataset of ``dataset`` (a ``MultiLabelDataset``: ``targets`` [N, K], 1 = positive)."""
    if split not in CONTEXTS:
        raise ValueError(f"split must be one of {', '.join(CONTEXTS)}, got {split!r}")
    positives = (dataset.targets > 0).sum(0).tolist()
    profile = {
        "images": len(dataset),
        "labels": len(label_names),
        "positives": int(sum(positives)),
        "label_counts": {name: int(n) for name, n in zip(label_names, positives, strict=True)},
    }
    return ImageSplit(
        source=_source(str(root)),
        name=split_name(str(root), split),
        digest=split_digest(fingerprint, split),
        schema=_schema(),
        profile=profile,
    )


def log_split(
    client, run_id: str, split: str, dataset, label_names, fingerprint: str, root: str
) -> ImageSplit:
    """Log one split as an input of run ``run_id`` (context per ``CONTEXTS``); returns the MLflow dataset.

    The registry calls this for a promotion evaluation's split: with the same data (fingerprint) and
    ``data.root`` folder it is the same entity as the training runs' split.
    """
    entity = image_split(split, dataset, label_names, fingerprint, root)
    _log(client, run_id, [(entity, CONTEXTS[split])])
    return entity


def log_splits(client, run_id: str, splits, root: str) -> dict[str, ImageSplit]:
    """Log a training run's train, holdout and test splits (a ``DataSplits``) as its inputs, in one call.

    Idempotent: MLflow keeps one input per run and dataset, so a resumed run may log them again.
    """
    entities = {
        split: image_split(split, getattr(splits, split), splits.label_names, splits.fingerprint, root)
        for split in CONTEXTS
    }
    _log(client, run_id, [(entities[s], CONTEXTS[s]) for s in CONTEXTS])
    return entities


def _log(client, run_id: str, items: list[tuple[ImageSplit, str]]) -> None:
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = [
        DatasetInput(entity._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, context)])
        for entity, context in items
    ]
    client.log_inputs(run_id, datasets=inputs)
