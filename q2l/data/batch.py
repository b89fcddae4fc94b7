"""What a loader yields: ``Batch`` (uint8 images, targets, dataset indices, count of dropped bad samples)."""

from __future__ import annotations

import torch


class Batch(tuple):
    """``(images uint8 [B,3,S,S], targets [B,K], indices long [B])`` plus ``skipped``: bad samples dropped."""

    skipped: int

    def __new__(cls, items, skipped: int = 0):
        obj = super().__new__(cls, items)
        obj.skipped = skipped
        return obj

    def pin_memory(self) -> Batch:
        """Pinned copy (DataLoader calls this, which keeps ``skipped``)."""
        return Batch((t.pin_memory() for t in self), self.skipped)

    def __reduce__(self):
        return (Batch, (tuple(self), self.skipped))


class Collate:
    """Stacks items into a ``Batch``, dropping the None items of skipped bad images and counting them."""

    def __init__(self, image_size: int, num_classes: int):
        self.image_size = image_size
        self.num_classes = num_classes

    def __call__(self, items: list) -> Batch:
        kept = [it for it in items if it is not None]
        if not kept:
            s = self.image_size
            empty = (
                torch.zeros((0, 3, s, s), dtype=torch.uint8),
                torch.zeros((0, self.num_classes)),
                torch.zeros(0, dtype=torch.long),
            )
            return Batch(empty, len(items))
        images = torch.stack([it[0] for it in kept])
        targets = torch.stack([it[1] for it in kept])
        indices = torch.tensor([it[2] for it in kept], dtype=torch.long)
        return Batch((images, targets, indices), len(items) - len(kept))
