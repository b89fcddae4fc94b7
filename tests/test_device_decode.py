"""data.decode = device: the same images as the loader path, seeded augmentation, the bad-image policy."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from data_fixtures import claim_jpeg_size, image_array, truncate, write_jpeg, write_png_alpha

from q2l.config import ConfigError, DataConfig, config_from_dict
from q2l.data import (
    BadImageError,
    DeviceDecodedLoader,
    EncodedBatch,
    EncodedCollate,
    MultiLabelDataset,
    build_loader,
    device_decode,
)
from q2l.data.cache import ResizedCache
from q2l.data.device_decode import EncodedItem
from q2l.data.images import BadImagePolicy
from q2l.data.transforms import Augment

torch.set_num_threads(1)

SIZE = 24


def _dataset(tmp_path, *, augment=None, on_bad_image="error", bad=None, cache=False):
    """Five JPEGs (varied sizes and modes), one RGBA PNG; ``bad``: index → corrupt, truncated, huge, missing.

    huge: a JPEG whose frame header claims 20000 x 20000 pixels (over the 40 M pixel default limit).
    """
    paths = [
        write_jpeg(tmp_path / "0.jpg", seed=0),
        write_jpeg(tmp_path / "1.jpg", seed=1, h=30, w=50, mode="L"),
        write_png_alpha(tmp_path / "2.png", seed=2),
        write_jpeg(tmp_path / "3.jpg", seed=3, h=SIZE, w=SIZE),
        write_jpeg(tmp_path / "4.jpg", seed=4, h=64, w=36),
        write_jpeg(tmp_path / "5.jpg", seed=5),
    ]
    for i, kind in (bad or {}).items():
        if kind == "corrupt":  # JPEG magic bytes, then garbage
            paths[i].write_bytes(b"\xff\xd8\xff" + b"not really a jpeg" * 20)
        elif kind == "truncated":
            truncate(paths[i])
        elif kind == "huge":
            claim_jpeg_size(paths[i], 20000, 20000)
        else:
            paths[i].unlink()
    targets = np.eye(3, dtype=np.float32)[[i % 3 for i in range(len(paths))]]
    paths = [str(p) for p in paths]
    rc = ResizedCache(tmp_path / "rc", paths, SIZE) if cache else None
    return MultiLabelDataset(
        paths, targets, ["a", "b", "c"], SIZE, augment=augment, on_bad_image=on_bad_image, cache=rc
    )


def _loader_path(ds, batch_size=4):
    cfg = DataConfig(image_size=SIZE, num_workers=0, on_bad_image=ds.policy.mode)
    return build_loader(ds, cfg, batch_size, train=False, seed=3)


def _device_path(ds, batch_size=4, workers=0, device="cpu"):
    """``build_loader`` for data.decode = device: encoded items, packed, decoded on ``device``."""
    cfg = DataConfig(image_size=SIZE, num_workers=workers, on_bad_image=ds.policy.mode, decode="device")
    loader = build_loader(ds, cfg, batch_size, train=False, seed=3, device=device)
    assert isinstance(loader, DeviceDecodedLoader)
    return loader


def _assert_same_batches(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a[0].dtype == torch.uint8 and a[0].shape[1:] == (3, SIZE, SIZE)
        assert all(torch.equal(x.cpu(), y) for x, y in zip(a, b, strict=True)) and a.skipped == b.skipped


def test_device_decode_on_cpu_equals_the_loader_path(tmp_path):
    ds = _dataset(tmp_path)
    items = [ds.encoded_view()[i] for i in range(len(ds))]
    assert [it.payload.ndim for it in items] == [1, 1, 3, 1, 1, 1]  # the PNG is decoded in the worker
    assert items[2].payload.shape == (3, SIZE, SIZE) and items[4].path == ds.paths[4]
    assert not ds.encoded and isinstance(ds[0], tuple)  # the view leaves the dataset as it was
    _assert_same_batches(list(_device_path(ds)), list(_loader_path(ds)))


def test_augmentation_on_the_device_path_is_seeded(tmp_path):
    ds = _dataset(tmp_path, augment=Augment(hflip=True))
    loader = _device_path(ds)
    first, second = list(loader), list(loader)
    loader.sampler.set_epoch(0)
    again = list(loader)
    plain = list(_device_path(_dataset(tmp_path / "plain")))
    assert not torch.equal(first[0][0], plain[0][0])
    assert not torch.equal(first[0][0], second[0][0])  # a new epoch, new seeds
    _assert_same_batches(again, first)
    loader_path = _loader_path(ds)
    loader_path.sampler.set_epoch(0)
    _assert_same_batches(first, list(loader_path))  # on the CPU: the same augmentation as in the workers


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "huge"])
def test_bad_jpeg_under_policy_error_names_the_file(tmp_path, kind):
    ds = _dataset(tmp_path, bad={4: kind})
    with pytest.raises(BadImageError) as e:
        list(_device_path(ds))
    assert e.value.path == ds.paths[4] and ds.paths[4] in str(e.value)


@pytest.mark.parametrize("kind", ["corrupt", "huge"])
def test_bad_jpeg_under_policy_skip_drops_only_it(tmp_path, kind):
    ds = _dataset(tmp_path, on_bad_image="skip", bad={1: kind})
    batches = list(_device_path(ds))
    assert [b.skipped for b in batches] == [1, 0]
    images, targets, indices = batches[0]
    assert indices.tolist() == [0, 2, 3] and images.shape == (3, 3, SIZE, SIZE) and len(targets) == 3
    good = _dataset(tmp_path / "good")
    assert torch.equal(images[1:], next(iter(_loader_path(good)))[0][2:4])


def test_oversized_jpeg_is_refused_before_the_device_decodes_it(tmp_path, monkeypatch):
    ds = _dataset(tmp_path, bad={0: "huge"})
    with pytest.raises(BadImageError) as e:
        list(_device_path(ds))
    assert e.value.path == ds.paths[0]
    assert e.value.reason == (
        "image of 20000 x 20000 = 400000000 pixels exceeds the limit of 40000000 (data.max_image_pixels)"
    )
    real, decoded = device_decode.decode_jpeg, []

    def recording(data, **kw):  # the real decoder, noting which bytes reach it
        decoded.extend(data if isinstance(data, list) else [data])
        return real(data, **kw)

    monkeypatch.setattr(device_decode, "decode_jpeg", recording)
    ds.policy = BadImagePolicy("skip")
    assert sum(b.skipped for b in _device_path(ds)) == 1
    huge = ds.encoded_view()[0].payload
    assert len(decoded) == 4 and not any(torch.equal(d, huge) for d in decoded if d.shape == huge.shape)
    # the dataset's limit reaches the device decoder and the worker's decode: all but 50 x 30 and 24 x 24
    small = _dataset(tmp_path / "small", on_bad_image="skip")
    small.max_pixels = 48 * 40 - 1
    batches = list(_device_path(small))
    assert sum(b.skipped for b in batches) == 4 and torch.cat([b[2] for b in batches]).tolist() == [1, 3]


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_missing_file_behaves_as_on_the_loader_path(tmp_path, policy):
    ds = _dataset(tmp_path, on_bad_image=policy, bad={5: "missing"})
    if policy == "error":
        with pytest.raises(BadImageError, match="5.jpg: file not found"):
            list(_device_path(ds))
    else:
        _assert_same_batches(list(_device_path(ds)), list(_loader_path(ds)))
        assert ds.encoded_view()[5] is None


def test_cached_images_come_decoded_from_the_workers(tmp_path):
    ds = _dataset(tmp_path, cache=True)
    want = list(_loader_path(ds))  # fills the cache
    assert all(ds.encoded_view()[i].payload.ndim == 3 for i in range(len(ds)))
    _assert_same_batches(list(_device_path(ds)), want)


def test_two_workers_len_and_sampler_forwarding(tmp_path):
    ds = _dataset(tmp_path, on_bad_image="skip", bad={1: "corrupt", 3: "missing"}, augment=Augment())
    loader = _device_path(ds, batch_size=4, workers=2)
    assert len(loader) == 2 and loader.dataset.encoded
    assert loader.sampler is loader.loader.sampler and loader.batch_sampler.sampler is loader.sampler
    loader.sampler.set_epoch(5)
    in_workers = list(loader)
    in_process = _device_path(ds, batch_size=4)
    in_process.sampler.set_epoch(5)
    _assert_same_batches(in_workers, list(in_process))
    assert [b.skipped for b in in_workers] == [2, 0]


def test_encoded_batch_pickles_with_skipped():
    empty = EncodedCollate(2)([None, None])
    assert empty.payloads == [] and empty.targets.shape == (0, 2) and empty.skipped == 2
    item = EncodedItem(torch.arange(5, dtype=torch.uint8), torch.ones(2), 7, 11, "x.jpg")
    batch = pickle.loads(pickle.dumps(EncodedCollate(2)([None, item])))
    assert isinstance(batch, EncodedBatch) and batch.skipped == 1 and batch.seeds == [11]
    assert torch.equal(batch.payloads[0], item.payload) and batch.paths == ["x.jpg"]


def test_engine_trains_the_same_on_device_decoded_batches(tmp_path):
    # the whole path the Ray worker takes: build_loader(device=...) → Engine; bitwise-equal images and the
    # same seeds make the same epoch, loss for loss
    from model_fixtures import tiny_config_dict, tiny_model

    from q2l.engine import Engine
    from q2l.losses import build_loss

    ds = _dataset(tmp_path, augment=Augment(hflip=True))
    raw = tiny_config_dict(tmp_path, train={"epochs": 1, "batch_size": 2, "ema_decay": None})
    results = {}
    for decode in ("loader", "device"):
        raw["data"].update({"image_size": SIZE, "decode": decode})
        cfg = config_from_dict(raw, "test")
        loader = build_loader(ds, cfg.data, 2, train=True, seed=0, device="cpu")
        assert isinstance(loader, DeviceDecodedLoader) == (decode == "device")
        engine = Engine(tiny_model(0, 3), build_loss(cfg.loss), cfg, len(loader), "cpu")
        stats = engine.train_one_epoch(loader, 0)
        results[decode] = (stats["loss"], stats["images"], engine.model.state_dict())
    (loss_a, n_a, w_a), (loss_b, n_b, w_b) = results["loader"], results["device"]
    assert n_a == n_b == 6 and loss_a == loss_b
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)


def test_decode_key_is_validated():
    with pytest.raises(ConfigError, match=r"data\.decode = 'gpu'"):
        config_from_dict({"data": {"decode": "gpu"}}, "run.yaml")
    assert config_from_dict({"data": {"decode": "device"}}).data.decode == "device"


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_cuda_decode_is_close_to_the_cpu_decode(tmp_path):
    ds = _dataset(tmp_path)
    on_cuda = list(_device_path(ds, device="cuda"))
    assert all(b[0].device.type == "cuda" for b in on_cuda)
    for a, b in zip(on_cuda, _loader_path(ds), strict=True):
        assert (a[0].cpu().int() - b[0].int()).abs().float().mean() < 2  # nvJPEG's IDCT differs slightly
        assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])


@cuda
def test_augment_on_cuda_is_seeded_and_draws_on_the_cpu():
    img = torch.from_numpy(image_array(0, SIZE, SIZE)).permute(2, 0, 1).contiguous()
    aug = Augment(hflip=True)
    out = aug(img.cuda(), 9)
    assert out.device.type == "cuda" and out.dtype == torch.uint8 and out.shape == img.shape
    assert torch.equal(aug(img.cuda(), 9), out)
    no_randaugment = Augment(randaugment=False, hflip=True)
    for seed in range(8):  # cutout and flip draw from the CPU generator: the same pixels on both devices
        assert torch.equal(no_randaugment(img.cuda(), seed).cpu(), no_randaugment(img, seed))


@cuda
def test_oversized_jpeg_is_skipped_before_nvjpeg(tmp_path):
    ds = _dataset(tmp_path, on_bad_image="skip", bad={0: "huge"})
    batches = list(_device_path(ds, device="cuda"))
    assert sum(b.skipped for b in batches) == 1
    assert torch.cat([b[2] for b in batches]).tolist() == [1, 2, 3, 4, 5]
