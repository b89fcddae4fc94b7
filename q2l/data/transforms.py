"""Per-sample image transforms on uint8 tensors: squish resize, RandAugment, Cutout, horizontal flip.

Every random draw of one sample comes from a seed handed in by the sampler (``seed_for``), so a sample's
augmentation depends only on (run seed, epoch, index): the same for any worker count or worker assignment.
Normalisation is not done here: the engine does it on the device with the backbone's mean/std.
"""

from __future__ import annotations

import hashlib

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F


def seed_for(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample in one epoch (stable across Python processes, unlike ``hash``)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def squish_resize(img: torch.Tensor, size: int) -> torch.Tensor:
    """Resize to ``size``×``size`` ignoring aspect ratio (Q2L's recipe), antialiased, uint8 in and out."""
    if img.shape[-2:] == (size, size):
        return img
    return F.resize(img, [size, size], antialias=True)


class FastRandAugment(v2.RandAugment):
    """torchvision v2 ``RandAugment`` for exactly one image, without v2's per-call pytree machinery.

    ``forward`` repeats v2's own loop (same op table, magnitudes, and draws from the global generator, so
    the output equals ``v2.RandAugment()(img)`` under the same seed; a test checks this) but skips the
    flatten/unflatten of arbitrary input structures, which costs ~0.1 ms per image on one thread.
    """

    def forward(self, img):
        """One PIL image or uint8 tensor in, the same type out."""
        height, width = F.get_size(img)
        for _ in range(self.num_ops):
            transform_id, (magnitudes_fn, signed) = self._get_random_item(self._AUGMENTATION_SPACE)
            magnitudes = magnitudes_fn(self.num_magnitude_bins, height, width)
            magnitude = 0.0
            if magnitudes is not None:
                magnitude = float(magnitudes[self.magnitude])
                if signed and torch.rand(()) <= 0.5:
                    magnitude *= -1
            img = self._apply_image_or_video_transform(
                img, transform_id, magnitude, interpolation=self.interpolation, fill=self._fill
            )
        return img


class Augment:
    """RandAugment (torchvision v2, 2 ops, magnitude 9), then Cutout, then an optional horizontal flip.

    RandAugment runs on a PIL view of the uint8 tensor: torchvision's PIL kernels for its geometric ops,
    sharpness, autocontrast and equalize are 3-10× faster than its tensor kernels on one CPU thread
    (measured at 224 px: 0.47 ms vs 1.99 ms per image for the whole op); the two conversions cost ~0.09 ms.
    A tensor on another device (``data.decode = device``) is augmented there with the tensor kernels; every
    draw still comes from CPU generators seeded by ``seed``.

    ``cutout`` is the official CutoutPIL factor: a square of side ``cutout``×image side, centred at a random
    point and clipped at the border, is filled with one random colour (0 disables).
    """

    def __init__(self, *, randaugment: bool = True, cutout: float = 0.5, hflip: bool = False):
        self.randaugment = FastRandAugment() if randaugment else None
        self.cutout = cutout
        self.hflip = hflip

    def __call__(self, img: torch.Tensor, seed: int) -> torch.Tensor:
        """Augment a uint8 ``[3, H, W]`` tensor deterministically from ``seed``."""
        g = torch.Generator().manual_seed(seed)
        if self.randaugment is not None:
            # RandAugment draws from the global CPU generator: seed it for this sample only and restore it
            # afterwards, so neither the caller's stream (num_workers=0) nor the CUDA generators change.
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(int(torch.randint(2**62, (1,), generator=g)))
                if img.device.type == "cpu":
                    img = F.pil_to_tensor(self.randaugment(F.to_pil_image(img)))
                else:
                    img = self.randaugment(img)
        if self.cutout > 0:
            img = cutout(img, self.cutout, g)
        if self.hflip and torch.rand((), generator=g) < 0.5:
            img = img.flip(-1)
        return img

    def __repr__(self) -> str:
        return (
            f"Augment(randaugment={self.randaugment is not None}, cutout={self.cutout}, hflip={self.hflip})"
        )


def cutout(img: torch.Tensor, factor: float, generator: torch.Generator) -> torch.Tensor:
    """Fill a random square of side ``factor``×side (clipped at the border) with a random colour."""
    _, h, w = img.shape
    ch, cw = int(factor * h + 0.5), int(factor * w + 0.5)
    yc = int(torch.randint(h, (1,), generator=generator))
    xc = int(torch.randint(w, (1,), generator=generator))
    y0, y1 = max(0, yc - ch // 2), min(h, yc + ch // 2)
    x0, x1 = max(0, xc - cw // 2), min(w, xc + cw // 2)
    colour = torch.randint(256, (3, 1, 1), generator=generator, dtype=torch.uint8).to(img.device)
    img = img.clone()
    img[:, y0:y1, x0:x1] = colour
    return img
