"""Evaluate a packaged model (a ``Predictor``) on a split of a data set, as training evaluates.

The split is built by ``q2l.data.build_datasets`` at the model's own image size (decode → squish resize →
uint8), the predictor normalises with the model's stored mean/std, and the scores are reordered into the
data set's label order before ``q2l.metrics.summarize``. A model whose label set differs from the data's is
refused (``LabelMismatchError``) rather than scored against the wrong columns.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from q2l.config import DataConfig
from q2l.data import BadImageError, DataError, build_datasets, build_loader
from q2l.metrics import MetricSummary, summarize
from q2l.packaging import Predictor

SPLITS = ("test", "holdout")


class EvaluationDataError(Exception):
    """The evaluation data set is missing, empty or unreadable; the message names the data root and split."""


class LabelMismatchError(Exception):
    """Two label sets that must be equal are not; the message lists what is missing on each side."""


@dataclass
class EvalSplit:
    """One split of a data set, ready to evaluate a model of ``image_size`` on."""

    dataset: torch.utils.data.Dataset
    label_names: list[str]
    fingerprint: str
    split: str
    image_size: int
    data_cfg: DataConfig

    def __len__(self) -> int:
        return len(self.dataset)


def load_split(data_cfg: DataConfig, split: str, image_size: int) -> EvalSplit:
    """The ``split`` ("test" or "holdout") of the configured data set, resized to ``image_size``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    cfg = dataclasses.replace(data_cfg, image_size=image_size)
    where = f"{split} split of data.root = {data_cfg.root!r} (data.format = {data_cfg.format})"
    try:
        splits = build_datasets(cfg, train=False)
    except (DataError, OSError) as e:
        raise EvaluationDataError(f"evaluation data set unavailable: {where}: {e}") from None
    dataset = splits.test if split == "test" else splits.holdout
    if len(dataset) == 0:
        raise EvaluationDataError(f"evaluation data set is empty: {where}")
    return EvalSplit(dataset, list(splits.label_names), splits.fingerprint, split, image_size, cfg)


def label_order(
    model_labels: list[str], reference: list[str], model_what: str, reference_what: str
) -> np.ndarray:
    """Columns putting ``model_labels`` in ``reference`` order; ``LabelMismatchError`` if the sets differ."""
    if set(model_labels) != set(reference) or len(model_labels) != len(reference):
        missing = sorted(set(reference) - set(model_labels))
        extra = sorted(set(model_labels) - set(reference))
        raise LabelMismatchError(
            f"label sets differ: {model_what} has {len(model_labels)} labels, "
            f"{reference_what} {len(reference)}; "
            f"missing in {model_what}: {missing or 'none'}; not in {reference_what}: {extra or 'none'}"
        )
    position = {name: i for i, name in enumerate(model_labels)}
    return np.array([position[name] for name in reference], dtype=np.int64)


def predict_split(
    predictor: Predictor, data: EvalSplit, batch_size: int = 64, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities [N, K] and targets [N, K], both in the data set's label order."""
    if data.image_size != predictor.image_size:
        raise ValueError(f"split resized to {data.image_size} px, the model takes {predictor.image_size} px")
    columns = label_order(predictor.label_names, data.label_names, "the model", "the evaluation data")
    # data.num_workers comes from the config; the workers are persistent only within this loader
    loader = build_loader(data.dataset, data.data_cfg, batch_size, train=False, seed=0)
    scores, targets = [], []
    batches = loader
    if progress:
        from tqdm import tqdm

        batches = tqdm(loader, total=len(loader), unit="batch", desc=f"evaluate ({data.split})")
    try:
        for images, batch_targets, _ in batches:
            if images.shape[0] == 0:
                continue
            scores.append(torch.from_numpy(predictor.predict_tensors(images)[:, columns]))
            targets.append(batch_targets.float())
    except BadImageError as e:
        raise EvaluationDataError(
            f"evaluation image unreadable (set data.on_bad_image=skip to skip it): {e}"
        ) from None
    if not scores:
        raise EvaluationDataError(f"no readable image in the {data.split} split of {data.data_cfg.root!r}")
    return torch.cat(scores), torch.cat(targets)


def evaluate_split(
    predictor: Predictor, data: EvalSplit, batch_size: int = 64, progress: bool = False
) -> MetricSummary:
    """Metrics of ``predictor`` on an already loaded split."""
    scores, targets = predict_split(predictor, data, batch_size, progress)
    return summarize(scores, targets, top_k=min(3, scores.shape[1]))


def evaluate(
    predictor: Predictor,
    data_cfg: DataConfig,
    split: str = "test",
    batch_size: int = 64,
    progress: bool = False,
) -> MetricSummary:
    """Metrics of ``predictor`` on the ``split`` of the ``data_cfg`` data set, at the model's image size."""
    return evaluate_split(predictor, load_split(data_cfg, split, predictor.image_size), batch_size, progress)
