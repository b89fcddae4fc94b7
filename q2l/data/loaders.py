"""DataLoaders: per-sample seeded sampling, DDP sharding, core planning, optional decoding on the device.

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
from q2l.data.batch import Collate
from q2l.data.device_decode import DeviceDecodedLoader, DeviceDecoder, EncodedCollate
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
    num_workers: int | None = None,
    device: torch.device | str | None = None,
) -> DataLoader | DeviceDecodedLoader:
    """A DataLoader yielding ``Batch`` es; train shuffles (seeded) and drops a last partial batch.

    ``device`` is where the batches go (None: the CPU): batches for a GPU come in pinned memory, and with
    ``data.decode = device`` workers only read the files and the returned ``DeviceDecodedLoader`` decodes,
    resizes and augments each batch there. Worker processes: ``num_workers``, else ``data.num_workers``,
    else ``plan_cpus`` over this machine's cores shared by ``world_size`` local processes; persistent.
    """
    if world_size > 1 or train:
        base = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=train, seed=seed, drop_last=False
        )
    else:
        base = SequentialSampler(dataset)
    sampler = SeededSampler(base, seed)
    device_type = torch.device(device).type if device is not None else "cpu"
    workers = num_workers if num_workers is not None else data_cfg.num_workers
    if workers is None:
        workers = plan_cpus(local_cores() // max(1, world_size), device_type).loader_workers
    image_size = getattr(dataset, "image_size", data_cfg.image_size)
    num_classes = len(getattr(dataset, "label_names", [])) or int(dataset[0][1].numel())
    on_device = data_cfg.decode == "device" and device is not None
    if on_device:
        decoder = DeviceDecoder(
            image_size,
            getattr(dataset, "augment", None),
            data_cfg.on_bad_image,
            max_pixels=getattr(dataset, "max_pixels", data_cfg.max_image_pixels),
        )
        dataset = dataset.encoded_view()
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=EncodedCollate(num_classes) if on_device else Collate(image_size, num_classes),
        pin_memory=device_type == "cuda",
        drop_last=train and len(sampler) >= batch_size,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=_worker_init if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )
    return DeviceDecodedLoader(loader, decoder, device) if on_device else loader
