"""AsymmetricLoss against a hand-written float64 reference of the official formula."""

import math

import numpy as np
import pytest
import torch

from q2l.config import LossConfig
from q2l.losses import AsymmetricLoss, build_loss

torch.set_num_threads(1)


def _reference(x: np.ndarray, y: np.ndarray, gamma_neg, gamma_pos, clip, eps) -> float:
    """The official ASL forward, element by element in float64."""
    total = 0.0
    for xi, yi in zip(x.ravel().tolist(), y.ravel().tolist(), strict=True):
        p = 1.0 / (1.0 + math.exp(-xi))
        p_neg = 1.0 - p
        if clip > 0:
            p_neg = min(p_neg + clip, 1.0)
        term = yi * math.log(max(p, eps)) + (1 - yi) * math.log(max(p_neg, eps))
        if gamma_neg > 0 or gamma_pos > 0:
            pt = p * yi + p_neg * (1 - yi)
            term *= (1 - pt) ** (gamma_pos * yi + gamma_neg * (1 - yi))
        total -= term
    return total


def _reference_torch(x, y, gamma_neg, gamma_pos, clip, eps):
    """Differentiable float64 reference (focusing weight detached, as the official code does)."""
    p = torch.sigmoid(x)
    p_neg = 1 - p
    if clip > 0:
        p_neg = torch.minimum(p_neg + clip, torch.ones_like(p_neg))
    loss = y * torch.log(torch.maximum(p, torch.full_like(p, eps)))
    loss = loss + (1 - y) * torch.log(torch.maximum(p_neg, torch.full_like(p, eps)))
    if gamma_neg > 0 or gamma_pos > 0:
        pt = p * y + p_neg * (1 - y)
        loss = loss * ((1 - pt) ** (gamma_pos * y + gamma_neg * (1 - y))).detach()
    return -loss.sum()


def _data(seed=0, b=6, k=9, scale=4.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, k, generator=g, dtype=torch.float64) * scale).to(dtype)
    y = (torch.rand(b, k, generator=g) < 0.3).to(dtype)
    return x, y


SETTINGS = [
    (4, 1, 0.05, 1e-8),
    (2, 0, 0.0, 1e-5),
    (4, 0, 0.05, 1e-8),
    (0, 2, 0.2, 1e-8),
    (1.5, 0.5, 0.0, 1e-3),
]


@pytest.mark.parametrize("gamma_neg,gamma_pos,clip,eps", SETTINGS)
def test_sum_equals_reference_float64(gamma_neg, gamma_pos, clip, eps):
    x, y = _data(seed=int(gamma_neg * 10))
    loss = AsymmetricLoss(gamma_neg, gamma_pos, clip, eps, reduction="sum")(x, y)
    expected = _reference(x.numpy(), y.numpy(), gamma_neg, gamma_pos, clip, eps)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("gamma_neg,gamma_pos,clip,eps", SETTINGS)
def test_gradient_matches_reference(gamma_neg, gamma_pos, clip, eps):
    x, y = _data(seed=7)
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    AsymmetricLoss(gamma_neg, gamma_pos, clip, eps)(x1, y).backward()
    _reference_torch(x2, y, gamma_neg, gamma_pos, clip, eps).backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-9, atol=1e-12)
    assert torch.is_grad_enabled()  # no global toggle left behind


def test_bce_special_case():
    x, y = _data(seed=3, scale=2.0)
    loss = AsymmetricLoss(gamma_neg=0, gamma_pos=0, clip=0, eps=1e-8)(x, y)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(x, y, reduction="sum")
    assert loss.item() == pytest.approx(bce.item(), rel=1e-9)


def test_reductions():
    x, y = _data(seed=4)
    per = AsymmetricLoss(reduction="none")(x, y)
    assert per.shape == x.shape
    assert AsymmetricLoss(reduction="sum")(x, y).item() == pytest.approx(per.sum().item())
    assert AsymmetricLoss(reduction="mean")(x, y).item() == pytest.approx(per.mean().item())


@pytest.mark.parametrize("clip", [0.0, 0.05])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_large_logits_are_finite(dtype, clip):
    x = torch.tensor([[30.0, -30.0, 60.0, -60.0, 0.0, 11.0]], dtype=dtype).requires_grad_()
    y = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0, 0.0]], dtype=dtype)
    loss = AsymmetricLoss(gamma_neg=4, gamma_pos=1, clip=clip, eps=1e-8)(x, y)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    expected = _reference(x.detach().double().numpy(), y.double().numpy(), 4, 1, clip, 1e-8)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    loss.backward()
    assert torch.isfinite(x.grad.float()).all()


def test_autocast_bf16_computes_in_fp32():
    x, y = _data(seed=5, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = torch.nn.functional.linear(x, torch.eye(x.shape[1]))  # bf16 under autocast
        assert logits.dtype == torch.bfloat16
        loss = AsymmetricLoss(2, 0, 0.0, 1e-5)(logits, y)
    assert loss.dtype == torch.float32
    expected = _reference(logits.double().detach().numpy(), y.double().numpy(), 2, 0, 0.0, 1e-5)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_partial_labels_ignored():
    x, y = _data(seed=6)
    unknown = torch.zeros_like(y, dtype=torch.bool)
    unknown[::2, 1::3] = True
    partial = torch.where(unknown, torch.full_like(y, -1.0), y)
    fn = AsymmetricLoss(partial_labels=True)
    known = ~unknown
    expected = _reference(x[known].numpy(), y[known].numpy(), 4, 1, 0.05, 1e-8)
    assert fn(x, partial).item() == pytest.approx(expected, rel=1e-9)
    # Changing logits of unknown entries changes nothing, and they receive no gradient.
    x2 = torch.where(unknown, x + 100, x).requires_grad_()
    loss = fn(x2, partial)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    loss.backward()
    assert (x2.grad[unknown] == 0).all()
    per = AsymmetricLoss(partial_labels=True, reduction="mean")(x, partial)
    assert per.item() == pytest.approx(expected / known.sum().item(), rel=1e-9)


def test_build_loss_and_validation():
    fn = build_loss(LossConfig(gamma_neg=3.0, gamma_pos=0.5, clip=0.1, eps=1e-6, partial_labels=True))
    assert (fn.gamma_neg, fn.gamma_pos, fn.clip, fn.eps, fn.partial_labels) == (3.0, 0.5, 0.1, 1e-6, True)
    assert fn.reduction == "sum"
    with pytest.raises(ValueError, match="reduction"):
        AsymmetricLoss(reduction="avg")
    with pytest.raises(ValueError, match="differ"):
        AsymmetricLoss()(torch.zeros(2, 3), torch.zeros(2, 4))
