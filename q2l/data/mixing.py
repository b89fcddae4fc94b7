"""CutMix and MixUp on a batch of normalised images with multi-hot targets (applied on the device).

Labels are mixed by the true area ratio: CutMix's box is clipped at the image border and λ is recomputed
from the clipped box, so the target weight equals the share of pixels that really came from each image.
Unknown labels (-1, partial annotation) stay unknown where either source is unknown.
"""

from __future__ import annotations

import numpy as np
import torch


def _beta(alpha: float, generator: torch.Generator) -> float:
    # torch's Beta sampler takes no generator; a numpy Generator seeded from the torch one keeps the draw
    # reproducible without touching any global state.
    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))
    return float(rng.beta(alpha, alpha))


def cutmix_box(h: int, w: int, lam: float, generator: torch.Generator) -> tuple[int, int, int, int]:
    """A box covering ~(1-λ) of the image, centred uniformly, clipped: ``(y0, y1, x0, x1)``."""
    ratio = float(np.sqrt(1.0 - lam))
    ch, cw = int(h * ratio), int(w * ratio)
    yc = int(torch.randint(h, (1,), generator=generator))
    xc = int(torch.randint(w, (1,), generator=generator))
    y0, y1 = max(0, yc - ch // 2), min(h, yc + ch // 2)
    x0, x1 = max(0, xc - cw // 2), min(w, xc + cw // 2)
    return y0, y1, x0, x1


def _mix_targets(targets: torch.Tensor, perm: torch.Tensor, lam: float) -> torch.Tensor:
    other = targets[perm]
    mixed = lam * targets + (1.0 - lam) * other
    unknown = (targets < 0) | (other < 0)
    return torch.where(unknown, torch.full_like(mixed, -1.0), mixed)


def mix_batch(
    images: torch.Tensor,
    targets: torch.Tensor,
    generator: torch.Generator,
    cutmix_alpha: float = 0.0,
    mixup_alpha: float = 0.0,
    prob: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """With probability ``prob`` apply CutMix or MixUp (one chosen at random when both alphas are > 0).

    ``images`` float ``[B, C, H, W]`` (any device), ``targets`` ``[B, K]``; ``generator`` is a CPU
    ``torch.Generator`` that makes every draw reproducible. Returns new tensors; the inputs are not modified.
    """
    if images.shape[0] < 2 or (cutmix_alpha <= 0 and mixup_alpha <= 0):
        return images, targets
    if float(torch.rand((), generator=generator)) >= prob:
        return images, targets
    use_cutmix = cutmix_alpha > 0
    if cutmix_alpha > 0 and mixup_alpha > 0:
        use_cutmix = bool(torch.rand((), generator=generator) < 0.5)
    perm = torch.randperm(images.shape[0], generator=generator).to(images.device)
    if use_cutmix:
        h, w = images.shape[-2:]
        y0, y1, x0, x1 = cutmix_box(h, w, _beta(cutmix_alpha, generator), generator)
        images = images.clone()
        images[:, :, y0:y1, x0:x1] = images[perm][:, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)  # the pasted area after clipping
    else:
        lam = _beta(mixup_alpha, generator)
        images = lam * images + (1.0 - lam) * images[perm]
    return images, _mix_targets(targets, perm, lam)
