"""Loaders: reproducible augmentation with workers, DDP sharding and padding, transforms, resized cache."""

from __future__ import annotations

import pytest
import torch
from data_fixtures import make_coco_set
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from q2l.config import DataConfig
from q2l.data import build_datasets, build_loader
from q2l.data.batch import Batch
from q2l.data.loaders import CpuPlan, local_cores, plan_cpus
from q2l.data.transforms import Augment, FastRandAugment, cutout

torch.set_num_threads(1)


def _set(tmp_path, n=9, **kw):
    images = [(f"{i}.jpg", [1 + (i % 2)]) for i in range(n)]
    root = make_coco_set(tmp_path, train=images, test=images, categories=[(1, "a"), (2, "b")])
    cfg = DataConfig(root=str(root), image_size=24, holdout_fraction=0.1, **kw)
    return cfg, build_datasets(cfg)


def _epoch(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return [(b[0].clone(), b[2].clone()) for b in loader]


def test_two_workers_deterministic_and_equal_to_in_process(tmp_path):
    cfg, s = _set(tmp_path, n=10, num_workers=2)
    a = build_loader(s.train, cfg, 4, train=True, seed=7)
    b = build_loader(s.train, cfg, 4, train=True, seed=7)
    ea, eb = _epoch(a, 0), _epoch(b, 0)
    assert len(ea) == len(a) == 2  # 9 train images, batch 4, last partial batch dropped
    for (ia, xa), (ib, xb) in zip(ea, eb, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ia, ib)
    cfg0 = DataConfig(**{**cfg.__dict__, "num_workers": 0})
    c = build_loader(s.train, cfg0, 4, train=True, seed=7)
    for (ia, _), (ic, _) in zip(ea, _epoch(c, 0), strict=True):
        assert torch.equal(ia, ic)  # augmentation does not depend on the worker count
    e1 = _epoch(a, 1)
    assert not all(torch.equal(x[1], y[1]) for x, y in zip(ea, e1, strict=True))  # new epoch: new order
    assert not torch.equal(
        build_loader(s.train, cfg, 4, train=True, seed=8).__iter__().__next__()[0], ea[0][0]
    )
    assert torch.equal(_epoch(a, 0)[0][0], ea[0][0])  # set_epoch(0) again replays epoch 0


def test_augmentation_changes_images_but_keeps_dtype_and_shape(tmp_path):
    cfg, s = _set(tmp_path, num_workers=0)
    img, target, index = s.train[(0, 123)]
    plain = s.train.load_resized(0)
    assert img.dtype == torch.uint8 and img.shape == (3, 24, 24) and index == 0
    assert not torch.equal(img, plain)
    assert torch.equal(s.train[(0, 123)][0], img)  # same seed, same augmentation


def test_eval_loader_sequential_and_complete(tmp_path):
    cfg, s = _set(tmp_path, num_workers=0)
    loader = build_loader(s.test, cfg, 4, train=False, seed=0)
    idx = torch.cat([b[2] for b in loader])
    assert idx.tolist() == list(range(len(s.test)))
    assert torch.equal(next(iter(loader))[0][0], s.test[0][0])  # no augmentation on test


@pytest.mark.parametrize("train", [True, False])
def test_distributed_padding_duplicates_can_be_dropped(tmp_path, train):
    cfg, s = _set(tmp_path, n=9, num_workers=0)
    n = len(s.test)
    assert n % 2 == 1
    per_rank = []
    for rank in range(2):
        # batch 1 for training: nothing lost to drop_last, so the union must be the whole set
        loader = build_loader(s.test, cfg, 1 if train else 2, train=train, seed=0, rank=rank, world_size=2)
        loader.sampler.set_epoch(0)
        per_rank.append(torch.cat([b[2] for b in loader]).tolist())
    assert len(per_rank[0]) == len(per_rank[1]) == (n + 1) // 2  # padded to equal length
    all_indices = per_rank[0] + per_rank[1]
    assert len(all_indices) == n + 1  # one padding duplicate
    assert sorted(set(all_indices)) == list(range(n))  # dropping duplicates by index gives the set


def test_cpu_plan_splits_cores_between_step_and_loader():
    # CPU: in-line loading below 4 cores, one worker per 8 cores above; the step keeps the rest
    assert plan_cpus(1) == CpuPlan(threads=1, loader_workers=0)
    assert plan_cpus(2) == CpuPlan(threads=2, loader_workers=0)
    assert plan_cpus(4) == CpuPlan(threads=3, loader_workers=1)
    assert plan_cpus(32) == CpuPlan(threads=28, loader_workers=4)
    assert plan_cpus(0.5) == CpuPlan(threads=1, loader_workers=0)  # a fractional Ray reservation
    # GPU: one launching thread, every other core loads
    assert plan_cpus(8, "cuda") == CpuPlan(threads=1, loader_workers=7)
    assert plan_cpus(1, "cuda") == CpuPlan(threads=1, loader_workers=1)
    # data.num_workers wins; the step takes what is left
    assert plan_cpus(8, "cpu", loader_workers=3) == CpuPlan(threads=5, loader_workers=3)
    assert plan_cpus(2, "cpu", loader_workers=4) == CpuPlan(threads=1, loader_workers=4)


def test_build_loader_sizes_workers_from_the_plan(tmp_path):
    cfg, s = _set(tmp_path, num_workers=None)
    expected = plan_cpus(local_cores()).loader_workers
    assert build_loader(s.train, cfg, 4, train=True, seed=0).num_workers == expected
    assert build_loader(s.train, cfg, 4, train=True, seed=0, num_workers=2).num_workers == 2
    pinned = build_loader(s.train, cfg, 4, train=True, seed=0, device="cuda")
    assert pinned.num_workers == plan_cpus(local_cores(), "cuda").loader_workers


def test_batch_survives_pickling_with_skipped():
    import pickle

    b = Batch((torch.zeros(1), torch.ones(1), torch.tensor([3])), 2)
    c = pickle.loads(pickle.dumps(b))
    assert isinstance(c, Batch) and c.skipped == 2 and c[2].tolist() == [3]
    images, targets, indices = c
    assert indices.tolist() == [3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning needs CUDA")
def test_batch_pin_memory_keeps_skipped():
    b = Batch((torch.zeros(2, 3), torch.ones(2, 1), torch.tensor([0, 1])), 1).pin_memory()
    assert b.skipped == 1 and all(t.is_pinned() for t in b)


def test_cutout_fills_clipped_square_with_one_colour():
    img = torch.zeros((3, 20, 20), dtype=torch.uint8)
    out = cutout(img, 0.5, torch.Generator().manual_seed(0))
    changed = (out != 0).any(0)
    rows, cols = changed.any(1).nonzero(), changed.any(0).nonzero()
    assert 0 < changed.sum() <= 100 and changed.sum() == len(rows) * len(cols)  # one axis-aligned box
    assert img.sum() == 0  # input untouched


def test_hflip_and_no_ops():
    img = torch.arange(3 * 4 * 5, dtype=torch.uint8).reshape(3, 4, 5)
    aug = Augment(randaugment=False, cutout=0.0, hflip=True)
    outs = {bool(torch.equal(aug(img, s), img.flip(-1))) for s in range(20)}
    assert outs == {True, False}
    assert torch.equal(Augment(randaugment=False, cutout=0.0, hflip=False)(img, 0), img)


def test_resized_cache_gives_the_same_images(tmp_path):
    cfg, s = _set(tmp_path, num_workers=0)
    cached_cfg = DataConfig(**{**cfg.__dict__, "cache_dir": str(tmp_path / "rc")})
    c = build_datasets(cached_cfg)
    assert len(list((tmp_path / "rc").glob("resized-24px-*.u8"))) == 3  # train, holdout, test
    for i in range(len(c.test)):
        first = c.test[i][0]
        assert c.test.cache.get(i) is not None
        assert torch.equal(first, s.test[i][0]) and torch.equal(c.test[i][0], first)
    loader = build_loader(
        c.train, DataConfig(**{**cached_cfg.__dict__, "num_workers": 2}), 4, train=True, seed=0
    )
    list(loader)  # workers fill the shared file
    again = build_datasets(cached_cfg)
    assert all(again.train.cache.get(i) is not None for i in range(len(again.train)))


def test_fast_randaugment_equals_torchvision_v2():
    img = torch.randint(0, 256, (3, 20, 24), dtype=torch.uint8)
    for seed in range(25):
        for x in (img, F.to_pil_image(img)):
            torch.manual_seed(seed)
            ours = FastRandAugment()(x)
            torch.manual_seed(seed)
            ref = v2.RandAugment()(x)
            as_tensor = (lambda t: t) if isinstance(x, torch.Tensor) else F.pil_to_tensor
            assert torch.equal(as_tensor(ours), as_tensor(ref)), seed
