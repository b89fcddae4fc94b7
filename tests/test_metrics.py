"""Metrics against scikit-learn, torchmetrics and straightforward numpy / loop references."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score
from torchmetrics.functional.classification import multilabel_average_precision

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


def test_average_precision_equals_torchmetrics_with_unknowns():
    scores, targets = _random_case(n=500, seed=11, decimals=2)
    keep = torch.rand(targets.shape, generator=torch.Generator().manual_seed(2)) < 0.8
    partial = torch.where(keep, targets, torch.full_like(targets, -1.0))
    ap = average_precision(scores, partial)
    with pytest.warns(UserWarning, match="No positive samples"):  # class 3
        ref = multilabel_average_precision(
            scores.double(), partial.long(), num_labels=12, average="none", ignore_index=-1
        )
    for k in range(12):
        if k == 3:  # no positive: excluded (NaN) here; torchmetrics returns its own placeholder
            assert math.isnan(ap[k])
            continue
        assert ap[k].item() == pytest.approx(ref[k].item(), abs=1e-6), k


def _prf_numpy(pred: np.ndarray, targets: np.ndarray) -> tuple[float, ...]:
    """The paper's CP, CR, CF1, OP, OR, OF1 (0-100), written out in numpy.

    Unknown targets (-1) are ignored; per-class means over classes with a positive; a class without
    predictions has precision 0; CF1 = 2 CP CR / (CP + CR), OF1 likewise from OP and OR.
    """
    known, positive = targets >= 0, targets > 0.5
    pred = pred & known
    tp = (pred & positive).sum(0).astype(np.float64)
    n_pred, n_pos = pred.sum(0).astype(np.float64), positive.sum(0).astype(np.float64)
    valid = n_pos > 0
    cls_p = np.where(n_pred > 0, tp / np.maximum(n_pred, 1), 0.0)
    cls_r = tp / np.maximum(n_pos, 1)
    cp, cr = cls_p[valid].mean(), cls_r[valid].mean()
    op = tp.sum() / n_pred.sum() if n_pred.sum() > 0 else 0.0
    or_ = tp.sum() / n_pos.sum()

    def f1(p, r):
        return 2 * p * r / (p + r) if p + r > 0 else 0.0

    return tuple(100 * v for v in (cp, cr, f1(cp, cr), op, or_, f1(op, or_)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_thresholded_and_top_k_metrics_equal_numpy_reference(seed):
    scores, targets = _random_case(n=400, seed=seed, decimals=2)  # 0.5 itself occurs: ">=" predicts it
    keep = torch.rand(targets.shape, generator=torch.Generator().manual_seed(seed)) < 0.85
    targets = torch.where(keep, targets, torch.full_like(targets, -1.0))
    scores[:, 7] = 0.1  # a class never predicted at the threshold: precision 0
    assert (scores == 0.5).any()
    s = summarize(scores, targets, threshold=0.5)
    got = (s.cp, s.cr, s.cf1, s.op, s.or_, s.of1)
    assert got == pytest.approx(_prf_numpy(scores.numpy() >= 0.5, targets.numpy()), rel=1e-6)
    # top-k: distinct scores (tied scores at the k-th place may be picked either way)
    distinct = scores.double() + torch.arange(scores.numel()).view(scores.shape) * 1e-9
    for k in (1, 3, 5):
        s = summarize(distinct, targets, top_k=k)
        sc = distinct.numpy()
        top = np.zeros_like(sc, dtype=bool)
        np.put_along_axis(top, np.argsort(-sc, axis=1)[:, :k], True, axis=1)
        got = (s.cp_top3, s.cr_top3, s.cf1_top3, s.op_top3, s.or_top3, s.of1_top3)
        assert got == pytest.approx(_prf_numpy(top, targets.numpy()), rel=1e-6), k
