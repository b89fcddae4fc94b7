"""Seeding of torch, numpy and Python's ``random`` per process and per rank (DataLoader workers: q2l.data)."""

from __future__ import annotations

import random

import numpy as np
import torch


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed mixed from ``seed`` and ``keys`` (rank, epoch …); distinct keys give unrelated streams.

    ``seed + rank`` would make run (seed=0, rank=1) replay run (seed=1, rank=0); SeedSequence hashes instead.
    """
    state = np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def seed_everything(seed: int, *keys: int) -> int:
    """Seed torch (CPU and every CUDA device), numpy and ``random`` from ``derive_seed(seed, *keys)``.

    Call ``seed_everything(cfg.train.seed)`` before building the model so every rank starts from the same
    weights (DDP also broadcasts rank 0's), and ``seed_everything(seed, rank, epoch)`` for per-rank
    streams. Returns the derived seed.
    """
    derived = derive_seed(seed, *keys)
    torch.manual_seed(derived)  # also seeds all CUDA devices
    np.random.seed(derived % 2**32)
    random.seed(derived)
    return derived
