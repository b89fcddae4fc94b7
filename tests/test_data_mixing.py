"""CutMix / MixUp on multi-hot targets: λ equals the true pasted area, unknown labels stay unknown."""

from __future__ import annotations

import pytest
import torch

from q2l.data.mixing import mix_batch

torch.set_num_threads(1)


def _batch(b=6, h=17, w=23):
    # image i is constant i, target is one-hot i: the share of pixels from each source is measurable
    images = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, h, w).clone()
    return images, torch.eye(b)


@pytest.mark.parametrize("seed", range(12))
def test_cutmix_lambda_equals_pasted_area(seed):
    images, targets = _batch()
    out, mixed = mix_batch(images, targets, torch.Generator().manual_seed(seed), cutmix_alpha=1.0)
    for i in range(len(out)):
        own = (out[i, 0] == i).float().mean().item()
        assert mixed[i, i].item() == pytest.approx(own, abs=1e-6)
        assert mixed[i].sum().item() == pytest.approx(1.0)
        for j in range(len(out)):
            if j != i:
                assert mixed[i, j].item() == pytest.approx((out[i, 0] == j).float().mean().item(), abs=1e-6)
    assert torch.equal(images, _batch()[0])  # inputs untouched


def test_mixup_weights_and_determinism():
    images, targets = _batch()
    out, mixed = mix_batch(images, targets, torch.Generator().manual_seed(3), mixup_alpha=0.4)
    assert torch.allclose(mixed.sum(1), torch.ones(6))
    # images are constant i with one-hot targets i: each pixel must be the target-weighted mix of sources
    assert torch.allclose(out[:, 0, 0, 0], mixed @ torch.arange(6.0), atol=1e-5)
    pairs = mixed[(mixed > 0).sum(1) == 2]
    assert len(pairs) > 0 and torch.allclose(pairs.max(1).values, pairs.max(1).values[0].expand(len(pairs)))
    again = mix_batch(images, targets, torch.Generator().manual_seed(3), mixup_alpha=0.4)
    assert torch.equal(again[0], out) and torch.equal(again[1], mixed)


def test_unknown_labels_stay_unknown_and_prob_zero_is_identity():
    images, targets = _batch()
    targets[0, 3] = -1
    _, mixed = mix_batch(images, targets, torch.Generator().manual_seed(0), mixup_alpha=1.0)
    partner = [i for i in range(6) if mixed[i, 0] > 0 and i != 0]
    assert mixed[0, 3] == -1 and all(mixed[i, 3] == -1 for i in partner)
    out, same = mix_batch(images, targets, torch.Generator(), cutmix_alpha=1.0, prob=0.0)
    assert out is images and same is targets
