"""Metrics against scikit-learn and straightforward loop references."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from q2l.metrics import average_precision, summarize, voc_average_precision

torch.set_num_threads(1)


def _random_case(n=300, c=12, seed=0, decimals=1):
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, c)) < rng.uniform(0.05, 0.5, size=c)).astype(np.float32)
    # Informative but noisy scores, rounded so that many ties occur (incl. ties across pos/neg).
    scores = np.clip(0.3 * targets + 0.7 * rng.random((n, c)), 0, 1).round(decimals)
    targets[:, 3] = 0  # an all-negative class
    return torch.from_numpy(scores), torch.from_numpy(targets)


def _voc_loop(scores: np.ndarray, labels: np.ndarray) -> float:
    """All-point interpolated AP with tied scores as one threshold, written as plain loops."""
    num_pos = float(labels.sum())
    if num_pos == 0:
        return math.nan
    thresholds = sorted(set(scores.tolist()), reverse=True)
    recalls, precisions = [0.0], []
    for t in thresholds:
        sel = scores >= t
        tp = float((labels[sel] > 0).sum())
        precisions.append(tp / sel.sum())
        recalls.append(tp / num_pos)
    ap = 0.0
    for i in range(len(thresholds)):
        best = max(precisions[i:])
        ap += (recalls[i + 1] - recalls[i]) * best
    return ap


@pytest.mark.parametrize("decimals", [1, 2, 6])
def test_average_precision_equals_sklearn_with_ties(decimals):
    scores, targets = _random_case(decimals=decimals, seed=decimals)
    ap = average_precision(scores, targets)
    assert ap.dtype == torch.float64 and ap.shape == (12,)
    for k in range(targets.shape[1]):
        if k == 3:
            assert math.isnan(ap[k])
            continue
        expected = average_precision_score(targets[:, k].numpy(), scores[:, k].numpy())
        assert ap[k].item() == pytest.approx(expected, abs=1e-12), k


def test_average_precision_all_tied_and_perfect():
    targets = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    scores = torch.tensor([[0.5, 0.9], [0.5, 0.1], [0.5, 0.1], [0.5, 0.8]])
    ap = average_precision(scores, targets)
    # All tied: one threshold, precision = prevalence. Second column: positives ranked first.
    assert ap.tolist() == pytest.approx([0.5, 1.0])


def test_unknown_targets_are_ignored():
    scores, targets = _random_case(seed=5, decimals=2)
    keep = torch.rand(targets.shape, generator=torch.Generator().manual_seed(1)) < 0.7
    partial = torch.where(keep, targets, torch.full_like(targets, -1.0))
    ap = average_precision(scores, partial)
    for k in (0, 5, 9):
        m = keep[:, k].numpy()
        expected = average_precision_score(targets[m, k].numpy(), scores[m, k].numpy())
        assert ap[k].item() == pytest.approx(expected, abs=1e-12)


def test_voc_average_precision_matches_loop():
    scores, targets = _random_case(seed=3, decimals=2)
    voc = voc_average_precision(scores, targets)
    ap = average_precision(scores, targets)
    for k in range(targets.shape[1]):
        expected = _voc_loop(scores[:, k].numpy(), targets[:, k].numpy())
        if math.isnan(expected):
            assert math.isnan(voc[k])
        else:
            assert voc[k].item() == pytest.approx(expected, abs=1e-12)
            assert voc[k] >= ap[k] - 1e-12  # interpolation never lowers precision


def test_summarize_hand_computed():
    # 4 images, 3 classes; class 2 has no positive.
    scores = torch.tensor(
        [
            [0.9, 0.6, 0.1],
            [0.2, 0.7, 0.8],
            [0.6, 0.3, 0.2],
            [0.1, 0.4, 0.3],
        ]
    )
    targets = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    s = summarize(scores, targets, threshold=0.5, top_k=1)
    assert s.excluded == [2]
    # AP class 0: ranks 0.9(+) 0.6(-) 0.2(-) 0.1(+): (1 + 2/4)/2 = 0.75
    # AP class 1: 0.7(+) 0.6(+) 0.4(+) 0.3(-): 1.0
    assert s.per_class_ap[:2].tolist() == pytest.approx([0.75, 1.0])
    assert math.isnan(s.per_class_ap[2])
    assert s.map == pytest.approx(87.5)
    # Threshold 0.5: class 0 predicts {0, 2} -> tp 1, p 1/2, r 1/2; class 1 predicts {0, 1} -> p 1, r 2/3;
    # class 2 predicts {1} -> fp (excluded from per-class means, counted in pooled).
    cp, cr = (0.5 + 1.0) / 2, (0.5 + 2 / 3) / 2
    assert s.cp == pytest.approx(100 * cp)
    assert s.cr == pytest.approx(100 * cr)
    assert s.cf1 == pytest.approx(100 * 2 * cp * cr / (cp + cr))
    op, or_ = 3 / 5, 3 / 5
    assert (s.op, s.or_, s.of1) == pytest.approx((100 * op, 100 * or_, 100 * op))
    # Top-1: img0 -> c0 (tp), img1 -> c2 (fp), img2 -> c0 (fp), img3 -> c1 (tp).
    cp1, cr1 = (0.5 + 1.0) / 2, (0.5 + 1 / 3) / 2
    assert s.cp_top3 == pytest.approx(100 * cp1)
    assert s.cr_top3 == pytest.approx(100 * cr1)
    assert s.cf1_top3 == pytest.approx(100 * 2 * cp1 * cr1 / (cp1 + cr1))
    assert (s.op_top3, s.or_top3) == pytest.approx((100 * 2 / 4, 100 * 2 / 5))
    d = s.as_dict(prefix="holdout_")
    assert d["holdout_map"] == pytest.approx(87.5)
    assert d["holdout_or"] == pytest.approx(60.0)
    assert {"holdout_cf1_top3", "holdout_of1_top3", "holdout_of1"} <= d.keys()


def test_class_without_predictions_has_zero_precision():
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.2]])
    targets = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    s = summarize(scores, targets)
    assert s.cp == pytest.approx(100 * (0.5 + 0.0) / 2)
    assert s.cr == pytest.approx(100 * (1.0 + 0.0) / 2)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="scores and targets"):
        average_precision(torch.zeros(3, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="top_k"):
        summarize(torch.zeros(3, 2), torch.zeros(3, 2), top_k=0)


def test_coco_sized_input_is_fast():
    import time

    g = torch.Generator().manual_seed(0)
    scores = torch.rand(40504, 80, generator=g)
    targets = (torch.rand(40504, 80, generator=g) < 0.03).float()
    average_precision(scores[:100], targets[:100])  # warm-up
    t0 = time.perf_counter()
    summarize(scores, targets)
    assert time.perf_counter() - t0 < 5.0  # ~0.3 s measured on 1 thread; generous for a shared machine
