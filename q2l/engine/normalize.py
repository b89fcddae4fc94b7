"""uint8 images → the backbone's normalised floats, in one fused step on the device."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class Uint8Normalizer:
    """uint8 ``[B, C, H, W]`` → ``(x/255 − mean)/std``, computed as ``(x − 255·mean)/(255·std)``.

    The training engine and the packaged model's predictor both normalise this way, so a served model sees
    exactly the numbers training saw.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device | str):
        self.mean255 = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std255 = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise ``images`` (uint8, already on the normaliser's device) into a new float tensor."""
        if images.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images (normalised on the device), got {images.dtype}")
        return images.float().sub_(self.mean255).div_(self.std255)
