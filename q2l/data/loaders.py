"""DataLoaders: per-sample seeded sampling, DDP sharding, bad-sample dropping collate, core planning.

The sampler (a ``DistributedSampler``, also for one process so shuffling is seeded by seed + epoch) yields
``(index, sample_seed)`` pairs; datasets derive every augmentation draw from ``sample_seed``, so a run is
reproducible for any worker count, and persistent workers still see each epoch's seeds (the sampler runs
in the main process). Call ``loader.sampler.set_epoch(epoch)`` each epoch (resume-safe); without it each
new iteration advances the epoch by one.

With ``world_size > 1`` the DistributedSampler pads the last round with repeated indices so every rank gets
the same number of samples; batches carry each sample's dataset index so evaluation can drop the repeats.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler

from q2l.config import DataConfig
from q2l.data.transforms import seed_for


class SeededSampler(Sampler):
    """Wraps an index sampler; yields ``(index, seed_for(seed, epoch, index))``."""

    def __init__(self, base: Sampler, seed: int):
        self.base = base
        self.seed = seed
        self.epoch = 0
        self._explicit_epoch = False
        self._next_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Fix the epoch (shuffle order and augmentation seeds) for the next iteration."""
        self.epoch = epoch
        self._explicit_epoch = True

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if not self._explicit_epoch:
            self.epoch = self._next_epoch
            self._next_epoch += 1
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(self.epoch)
        for i in self.base:
            yield int(i), seed_for(self.seed, self.epoch, int(i))

    def __len__(self) -> int:
        return len(self.base)


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


def local_cores() -> int:
    """Cores this process may run on (its CPU affinity, else the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class CpuPlan:
    """How one training process splits its cores: torch intra-op ``threads`` and ``loader_workers``."""

    threads: int
    loader_workers: int


def plan_cpus(cores: int, device_type: str = "cpu", loader_workers: int | None = None) -> CpuPlan:
    """Split ``cores`` between the training step and the DataLoader workers.

    On CPU the step dominates (~25 ms per 96 px image against ~0.5 ms to load it), so loading runs in-line
    below 4 cores, where a worker process would take a core the step needs, and one worker per 8 cores
    overlaps it above. On a GPU the process only launches kernels: one thread, every other core loads.
    An explicit ``loader_workers`` (``data.num_workers``) is kept and the threads get the rest.
    """
    cores = max(1, int(cores))
    if device_type == "cpu":
        workers = (0 if cores < 4 else max(1, cores // 8)) if loader_workers is None else loader_workers
        return CpuPlan(threads=max(1, cores - workers), loader_workers=workers)
    workers = max(1, cores - 1) if loader_workers is None else loader_workers
    return CpuPlan(threads=1, loader_workers=workers)


def _worker_init(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; give Python's and numpy's global generators the
    # same per-worker seed so any third-party code that uses them is reproducible too.
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def build_loader(
    dataset: Dataset,
    data_cfg: DataConfig,
    batch_size: int,
    *,
    train: bool,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    num_workers: int | None = None,
) -> DataLoader:
    """A DataLoader yielding ``Batch`` es; train shuffles (seeded) and drops a last partial batch.

    Worker processes: ``num_workers``, else ``data.num_workers``, else ``plan_cpus`` over this machine's
    cores shared by ``world_size`` local processes; workers are persistent. Pass ``pin_memory=True`` when
    the batches go to a GPU.
    """
    if world_size > 1 or train:
        base = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=train, seed=seed, drop_last=False
        )
    else:
        base = SequentialSampler(dataset)
    sampler = SeededSampler(base, seed)
    workers = num_workers if num_workers is not None else data_cfg.num_workers
    if workers is None:
        device_type = "cuda" if pin_memory else "cpu"
        workers = plan_cpus(local_cores() // max(1, world_size), device_type).loader_workers
    image_size = getattr(dataset, "image_size", data_cfg.image_size)
    num_classes = len(getattr(dataset, "label_names", [])) or int(dataset[0][1].numel())
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=Collate(image_size, num_classes),
        pin_memory=pin_memory,
        drop_last=train and len(sampler) >= batch_size,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=_worker_init if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )
