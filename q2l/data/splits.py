"""Deterministic, order-independent splits: the held-out set carved from training, and size caps.

Each image key gets a rank from ``blake2b(seed:key)``; the lowest ``round(fraction·N)`` ranks form the
held-out set. The assignment depends only on the key and the seed (not on file order or on other images),
so it is stable across runs and machines, and each image is in exactly one split.
"""

from __future__ import annotations

import hashlib

import numpy as np


def _ranks(keys: list[str], seed: int) -> np.ndarray:
    digests = [hashlib.blake2b(f"{seed}:{k}".encode(), digest_size=8).digest() for k in keys]
    return np.array([int.from_bytes(d, "little") for d in digests], dtype=np.uint64)


def holdout_split(keys: list[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train_indices, holdout_indices)``, both sorted, disjoint, covering ``range(len(keys))``."""
    n = len(keys)
    n_holdout = int(round(fraction * n))
    if n >= 2:
        n_holdout = min(max(n_holdout, 1), n - 1)  # both sides non-empty whenever possible
    order = np.argsort(_ranks(keys, seed), kind="stable")
    return np.sort(order[n_holdout:]), np.sort(order[:n_holdout])


def cap(indices: np.ndarray, keys: list[str], max_items: int | None, seed: int) -> np.ndarray:
    """A deterministic subset of at most ``max_items`` of ``indices`` (sorted), chosen by key rank."""
    if max_items is None or len(indices) <= max_items:
        return indices
    ranks = _ranks([keys[i] for i in indices], seed + 1)
    return np.sort(indices[np.argsort(ranks, kind="stable")[:max_items]])
