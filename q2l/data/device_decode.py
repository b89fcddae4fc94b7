"""Decoding on the training device (``data.decode = device``) for GPU nodes short of CPU cores.

Loader workers only read files: a ``MultiLabelDataset(encoded=True)`` item carries a JPEG's bytes (or, for
other formats and cached images, the image decoded and resized in the worker, unaugmented).
``EncodedCollate`` packs a batch's payloads into one buffer, so a batch crosses the worker queue as one
shared-memory segment rather than one per image (file descriptors run out otherwise). ``DeviceDecoder``
decodes all JPEGs of a batch in one ``torchvision.io.decode_jpeg`` call on the device (nvJPEG on CUDA),
then squish-resizes and augments each image there with its sample seed. Each JPEG's size is checked from
its header first (``data.max_image_pixels``), so an oversized one is a bad image before nvJPEG allocates it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from q2l.data.batch import Batch
from q2l.data.images import DEFAULT_MAX_PIXELS, BadImageError, BadImagePolicy, check_image_size, decode_rgb
from q2l.data.transforms import Augment, squish_resize

JPEG_MAGIC = b"\xff\xd8\xff"


class EncodedItem(NamedTuple):
    """A sample left for the device: ``payload`` is JPEG bytes uint8 ``[N]`` or an image uint8 ``[3,S,S]``."""

    payload: torch.Tensor
    target: torch.Tensor
    index: int
    seed: int
    path: str


def is_jpeg(data: torch.Tensor) -> bool:
    """Whether ``data`` (file bytes) starts with the JPEG magic bytes FF D8 FF."""
    return data.ndim == 1 and bytes(data[:3].tolist()) == JPEG_MAGIC


@dataclasses.dataclass
class EncodedBatch:
    """A collated batch of ``EncodedItem`` s: payloads packed in ``buffer``, plus ``skipped`` bad samples."""

    buffer: torch.Tensor
    shapes: list[tuple[int, ...]]
    targets: torch.Tensor
    indices: torch.Tensor
    seeds: list[int]
    paths: list[str]
    skipped: int = 0

    @property
    def payloads(self) -> list[torch.Tensor]:
        """Each sample's payload: a view of ``buffer`` in its shape (JPEG bytes 1-D, images 3-D)."""
        if not self.shapes:
            return []
        chunks = self.buffer.split([math.prod(s) for s in self.shapes])
        return [chunk.view(shape) for chunk, shape in zip(chunks, self.shapes, strict=True)]

    def pin_memory(self) -> EncodedBatch:
        """Pinned copy (the DataLoader's pin-memory thread calls this)."""
        return dataclasses.replace(
            self,
            buffer=self.buffer.pin_memory(),
            targets=self.targets.pin_memory(),
            indices=self.indices.pin_memory(),
        )


class EncodedCollate:
    """Packs ``EncodedItem`` s into an ``EncodedBatch``; drops the None items of bad images, counting them."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def __call__(self, items: list) -> EncodedBatch:
        kept = [it for it in items if it is not None]
        return EncodedBatch(
            buffer=torch.cat([it.payload.reshape(-1) for it in kept])
            if kept
            else torch.zeros(0, dtype=torch.uint8),
            shapes=[tuple(it.payload.shape) for it in kept],
            targets=torch.stack([it.target for it in kept]) if kept else torch.zeros((0, self.num_classes)),
            indices=torch.tensor([it.index for it in kept], dtype=torch.long),
            seeds=[it.seed for it in kept],
            paths=[it.path for it in kept],
            skipped=len(items) - len(kept),
        )


class DeviceDecoder:
    """``EncodedBatch`` → ``Batch``: uint8 images ``[B,3,S,S]`` decoded, resized and augmented on a device."""

    def __init__(
        self,
        image_size: int,
        augment: Augment | None = None,
        on_bad_image: str = "error",
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        self.image_size = image_size
        self.augment = augment
        self.policy = BadImagePolicy(on_bad_image)
        self.max_pixels = max_pixels

    def __call__(self, batch: EncodedBatch, device: torch.device | str) -> Batch:
        """Decode ``batch`` on ``device``; targets and indices stay where they are."""
        device = torch.device(device)
        decoded = self._decode(batch.payloads, batch.paths, device)
        kept = [i for i, img in enumerate(decoded) if img is not None]
        images = []
        for i in kept:
            img = squish_resize(decoded[i], self.image_size)
            if self.augment is not None:
                img = self.augment(img, batch.seeds[i])
            images.append(img)
        s = self.image_size
        stacked = (
            torch.stack(images) if images else torch.zeros((0, 3, s, s), dtype=torch.uint8, device=device)
        )
        keep = torch.tensor(kept, dtype=torch.long)
        skipped = batch.skipped + len(decoded) - len(kept)
        return Batch((stacked, batch.targets[keep], batch.indices[keep]), skipped)

    def _decode(self, payloads: list[torch.Tensor], paths: list[str], device: torch.device) -> list:
        """Each payload as an image on ``device``, None for a bad one under policy skip."""
        images = [p.to(device, non_blocking=True) if p.ndim == 3 else None for p in payloads]
        jpegs = [i for i, p in enumerate(payloads) if p.ndim == 1 and self._size_ok(p, paths[i])]
        if not jpegs:
            return images
        try:
            decoded = decode_jpeg([payloads[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # the batched call gives no partial results: find the bad file(s) one by one
            decoded = [self._decode_one(payloads[i], paths[i], device) for i in jpegs]
        for i, img in zip(jpegs, decoded, strict=True):
            images[i] = img
        return images

    def _size_ok(self, data: torch.Tensor, path: str) -> bool:
        """Whether the JPEG's header size is within ``max_pixels``; False for a bad one under policy skip."""
        try:
            check_image_size(data, path, self.max_pixels)
        except BadImageError as e:
            self.policy.handle(e)
            return False
        return True

    def _decode_one(self, data: torch.Tensor, path: str, device: torch.device) -> torch.Tensor | None:
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            pass
        # what the device cannot decode goes through the loader path's decoder: its PIL fallback reads
        # JPEG variants nvJPEG rejects, and a truly bad file gets the same BadImageError as there
        try:
            return decode_rgb(path, self.max_pixels).to(device)
        except BadImageError as e:
            self.policy.handle(e)
            return None


class DeviceDecodedLoader:
    """Wraps a DataLoader of ``EncodedBatch`` es; yields ``Batch`` es decoded on ``device``."""

    def __init__(self, loader, decoder: DeviceDecoder, device: torch.device | str):
        self.loader = loader
        self.decoder = decoder
        self.device = torch.device(device)

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            yield self.decoder(batch, self.device)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def sampler(self):
        """The wrapped loader's sampler (the engine calls ``set_epoch`` on it)."""
        return self.loader.sampler

    @property
    def batch_sampler(self):
        """The wrapped loader's batch sampler."""
        return self.loader.batch_sampler

    @property
    def dataset(self):
        """The wrapped loader's (encoded) dataset."""
        return self.loader.dataset
