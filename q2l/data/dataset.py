"""The multi-label image dataset: one ``LabelTable`` slice, decoded, resized, optionally augmented."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch.utils.data import Dataset

from q2l.data.cache import ResizedCache
from q2l.data.device_decode import EncodedItem, is_jpeg
from q2l.data.images import DEFAULT_MAX_PIXELS, BadImageError, BadImagePolicy, decode_rgb, read_bytes
from q2l.data.transforms import Augment, seed_for, squish_resize


class MultiLabelDataset(Dataset):
    """Items ``(image uint8 [3,S,S], target float32 [K], index)``; None for a bad image under policy skip.

    An item can be asked for as ``ds[i]`` or as ``ds[(i, seed)]``: the loader's sampler passes a per-epoch
    sample seed so that augmentation is reproducible whatever the worker count.

    Images over ``max_pixels`` (``data.max_image_pixels``, read from the header) are bad images.

    With ``encoded=True`` items are ``EncodedItem`` s for decoding on the training device (``DeviceDecoder``):
    a JPEG's file bytes, or for other formats and cached images the decoded, resized, unaugmented image.
    """

    def __init__(
        self,
        paths: list[str],
        targets: np.ndarray,
        label_names: list[str],
        image_size: int,
        *,
        augment: Augment | None = None,
        on_bad_image: str = "error",
        cache: ResizedCache | None = None,
        keys: list[str] | None = None,
        encoded: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        if len(paths) != len(targets):
            raise ValueError(f"{len(paths)} paths but {len(targets)} target rows")
        self.paths = paths
        self.keys = keys if keys is not None else paths
        self.targets = torch.from_numpy(np.asarray(targets, dtype=np.float32))
        self.label_names = label_names
        self.image_size = image_size
        self.augment = augment
        self.policy = BadImagePolicy(on_bad_image)
        self.cache = cache
        self.encoded = encoded
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def load_resized(self, index: int) -> torch.Tensor:
        """Decoded and squish-resized image ``index`` (through the pre-resized cache when configured)."""
        if self.cache is not None:
            img = self.cache.get(index)
            if img is not None:
                return img
        img = squish_resize(decode_rgb(self.paths[index], self.max_pixels), self.image_size)
        if self.cache is not None:
            self.cache.put(index, img)
        return img

    def encoded_view(self) -> MultiLabelDataset:
        """A shallow copy of this dataset with ``encoded=True`` (same paths, targets, cache, augment)."""
        view = copy.copy(self)
        view.encoded = True
        return view

    def load_encoded(self, index: int, seed: int) -> EncodedItem:
        """Item ``index`` left for the device to decode: JPEG bytes, else the resized image."""
        payload = self.cache.get(index) if self.cache is not None else None
        if payload is None:
            payload = read_bytes(self.paths[index])
            if not is_jpeg(payload):
                payload = self.load_resized(index)  # rare formats: decoded here, as on the loader path
        return EncodedItem(payload, self.targets[index], index, seed, self.paths[index])

    def __getitem__(self, key: int | tuple[int, int]):
        index, seed = key if isinstance(key, tuple) else (key, seed_for(0, 0, key))
        try:
            if self.encoded:
                return self.load_encoded(index, seed)
            img = self.load_resized(index)
        except BadImageError as e:
            self.policy.handle(e)
            return None
        if self.augment is not None:
            img = self.augment(img, seed)
        return img, self.targets[index], index
