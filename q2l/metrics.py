"""Multi-label metrics: per-class AP, mAP, CP/CR/CF1 and OP/OR/OF1 (docs/design.md §4).

All functions take ``scores`` [N, C] (probabilities for the thresholded metrics) and ``targets`` [N, C]
with 1 = positive, 0 = negative and -1 = unknown; unknown entries are ignored everywhere. Everything is
vectorised over classes: one ``torch.sort`` of the whole matrix and cumulative sums. AP stays hand-written
because it is faster than torchmetrics' and scikit-learn's (experiments/benchmarks/metrics_bench.py has the
ratios; tests/test_metrics.py checks it against both); the thresholded and top-k precision and recall come
from torchmetrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def _check(scores: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.as_tensor(scores)
    targets = torch.as_tensor(targets)
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ValueError(
            f"metrics: scores and targets must both be [N, C], got {tuple(scores.shape)} and "
            f"{tuple(targets.shape)}"
        )
    return scores.detach().to(torch.float64), targets.detach().to(torch.float64)


def _ranked(scores: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class ranking with ties grouped, in class-major layout [C, N] (contiguous rows sort fastest).

    Returns ``(pos, precision, num_pos)``: ``pos`` [C, N] is 1 where the sample at that rank is a
    positive; ``precision`` [C, N] is the precision at the threshold of that rank's score, i.e. taken
    at the LAST index of its run of tied scores (tied scores form one threshold, as in scikit-learn);
    ``num_pos`` [C]. Unknown entries are moved below every known score and counted as neither
    positive nor negative.
    """
    known = (targets >= 0).T.contiguous()
    scores = torch.where(known, scores.T, torch.full_like(known, -math.inf, dtype=scores.dtype))
    # Order within a run of ties does not matter (the run is one threshold), so no stable sort.
    sorted_scores, order = torch.sort(scores, dim=1, descending=True)
    pos = (targets.T.gather(1, order) > 0.5).to(torch.float64)
    neg = known.gather(1, order).to(torch.float64) - pos
    tp = pos.cumsum(1)
    seen = tp + neg.cumsum(1)
    n = scores.shape[1]
    # Last index of each run of equal scores: a run ends where the next score differs (or at the end);
    # a reverse running minimum over "end index else n" gives each rank the end of its run.
    is_end = torch.ones_like(sorted_scores, dtype=torch.bool)
    is_end[:, :-1] = sorted_scores[:, 1:] != sorted_scores[:, :-1]
    rank = torch.arange(n, device=scores.device).expand_as(sorted_scores)
    run_end = torch.where(is_end, rank, n).flip(1).cummin(1).values.flip(1)
    precision = (tp / seen.clamp(min=1)).gather(1, run_end)
    return pos, precision, pos.sum(1)


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Non-interpolated AP per class (float64 [C]); equal to scikit-learn's ``average_precision_score``.

    AP = mean over positives of the precision at the threshold of each positive's score. Classes with
    no positive get NaN.
    """
    scores, targets = _check(scores, targets)
    pos, precision, num_pos = _ranked(scores, targets)
    ap = (pos * precision).sum(1) / num_pos
    return torch.where(num_pos > 0, ap, torch.full_like(ap, math.nan))


def voc_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """VOC all-point interpolated AP per class (official Q2L ``voc_mAP``), float64 [C]; NaN without positives.

    Precision is made monotone from the right (max over all lower thresholds) and summed over the
    recall steps. Tied scores form one threshold (the official code breaks ties by argsort order).
    """
    scores, targets = _check(scores, targets)
    pos, precision, num_pos = _ranked(scores, targets)
    interpolated = precision.flip(1).cummax(1).values.flip(1)
    ap = (pos * interpolated).sum(1) / num_pos
    return torch.where(num_pos > 0, ap, torch.full_like(ap, math.nan))


def _prf(pred: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> tuple[float, ...]:
    """CP, CR, CF1, OP, OR, OF1 (0-100) from boolean predictions and ``labels`` (1/0/-1, long).

    torchmetrics counts and divides (unknown labels ignored; a class with no predictions has precision 0:
    nothing retrieved, nothing right). CP and CR are per-class means over the ``valid`` classes only, not
    torchmetrics' "macro", which also averages classes without positives. CF1 and OF1 are the harmonic means
    of (CP, CR) and (OP, OR) as in the multi-label papers, not a mean of per-class F1.
    """
    # imported here: the Engine imports this module, and the GPU benchmark image (experiments/benchmarks/
    # gpu.sh) has torch, torchvision and timm only
    from torchmetrics.functional.classification import multilabel_precision, multilabel_recall

    kw = {"num_labels": labels.shape[1], "ignore_index": -1, "validate_args": False, "zero_division": 0}
    preds = pred.long()  # integer predictions: torchmetrics applies no threshold of its own
    if valid.any():
        cls_p = multilabel_precision(preds, labels, average="none", **kw).reshape(-1)
        cls_r = multilabel_recall(preds, labels, average="none", **kw).reshape(-1)
        cp = cls_p[valid].double().mean().item()
        cr = cls_r[valid].double().mean().item()
        or_ = multilabel_recall(preds, labels, average="micro", **kw).item()
    else:
        cp = cr = or_ = math.nan  # no positive label at all: recall is undefined
    op = multilabel_precision(preds, labels, average="micro", **kw).item()
    return tuple(100 * v for v in (cp, cr, _f1(cp, cr), op, or_, _f1(op, or_)))


def _f1(p: float, r: float) -> float:
    if math.isnan(p) or math.isnan(r):
        return math.nan
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


@dataclass
class MetricSummary:
    """The standard multi-label table. Percentages 0-100; ``per_class_ap`` 0-1 (NaN: no positive).

    Per-class means (``map``, ``cp``, ``cr``) use only classes with at least one positive; those
    without are listed in ``excluded``. ``cf1 = 2 cp cr / (cp + cr)`` (same for the pooled ``of1``).
    Per-class precision of a class with no predictions is 0. ``*_top3`` use the ``top_k`` highest
    scores of each image as its predictions (3 by default).
    """

    map: float
    per_class_ap: torch.Tensor
    excluded: list[int]
    cp: float
    cr: float
    cf1: float
    op: float
    or_: float
    of1: float
    cp_top3: float
    cr_top3: float
    cf1_top3: float
    op_top3: float
    or_top3: float
    of1_top3: float
    threshold: float = 0.5
    top_k: int = 3
    num_samples: int = field(default=0)

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """Scalar metrics as ``{prefix + name: value}`` (``or_`` is written ``or``)."""
        names = ["map", "cp", "cr", "cf1", "op", "or_", "of1"]
        names += [f"{n}_top3" for n in ("cp", "cr", "cf1", "op", "or", "of1")]
        out = {prefix + n.rstrip("_"): float(getattr(self, n)) for n in names}
        out[prefix + "num_excluded"] = float(len(self.excluded))
        return out


def summarize(
    scores: torch.Tensor, targets: torch.Tensor, threshold: float = 0.5, top_k: int = 3
) -> MetricSummary:
    """All metrics for probabilities ``scores`` [N, C] and ``targets`` [N, C] (1/0/-1).

    ``top_k`` larger than the number of classes is clamped to it (every label predicted).
    """
    scores, targets = _check(scores, targets)
    if top_k < 1:
        raise ValueError(f"summarize: top_k must be >= 1, got {top_k}")
    top_k = min(top_k, scores.shape[1])
    ap = average_precision(scores, targets)
    valid = ~torch.isnan(ap)
    excluded = torch.nonzero(~valid).flatten().tolist()
    mean_ap = 100 * ap[valid].mean().item() if valid.any() else math.nan

    labels = torch.where(targets >= 0, (targets > 0.5).long(), -1)
    # ">=": a score equal to the threshold is a prediction (torchmetrics' own thresholding uses ">")
    at_threshold = _prf(scores >= threshold, labels, valid)
    # top-k: each image's k highest scores are its predictions (torchmetrics has no multilabel top-k)
    top = torch.zeros_like(scores, dtype=torch.bool)
    top.scatter_(1, scores.topk(top_k, dim=1).indices, True)
    at_top = _prf(top, labels, valid)
    return MetricSummary(
        mean_ap,
        ap,
        excluded,
        *at_threshold,
        *at_top,
        threshold=threshold,
        top_k=top_k,
        num_samples=scores.shape[0],
    )
