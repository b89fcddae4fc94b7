"""Decoding real files and the bad-image policy (error stops naming the file; skip drops and counts)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from data_fixtures import make_coco_set, truncate, write_jpeg, write_png_alpha
from PIL import Image

from q2l.config import DataConfig
from q2l.data import BadImageError, build_datasets, build_loader, decode_rgb

torch.set_num_threads(1)


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_jpeg_modes_decode_to_rgb_like_pil(tmp_path, mode):
    path = write_jpeg(tmp_path / f"x_{mode}.jpg", seed=1, mode=mode)
    img = decode_rgb(path)
    assert img.dtype == torch.uint8 and img.shape == (3, 40, 48)
    ref = np.asarray(Image.open(path).convert("RGB"))
    assert np.abs(img.permute(1, 2, 0).numpy().astype(int) - ref).max() <= 2


def test_png_with_alpha_decodes_to_rgb(tmp_path):
    path = write_png_alpha(tmp_path / "a.png")
    img = decode_rgb(path)
    assert img.shape == (3, 40, 48)
    assert (img.permute(1, 2, 0).numpy() == np.asarray(Image.open(path).convert("RGB"))).all()


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p, "file not found"),
        (lambda p: (p.write_bytes(b""), p)[1], "empty file"),
        (lambda p: truncate(write_jpeg(p)), "truncated"),
        (lambda p: (p.write_bytes(b"this is not an image at all"), p)[1], "not a readable image"),
    ],
    ids=["missing", "zero-byte", "truncated", "garbage"],
)
def test_bad_files_raise_naming_the_path(tmp_path, make, reason):
    path = make(tmp_path / "bad.jpg")
    with pytest.raises(BadImageError, match=reason) as e:
        decode_rgb(path)
    assert e.value.path == str(path) and str(path) in str(e.value)


def _set_with_bad_images(tmp_path):
    images = [(f"{i}.jpg", [1]) for i in range(6)]
    root = make_coco_set(tmp_path, train=images, test=images, categories=[(1, "a"), (2, "b")])
    (root / "val2014" / "1.jpg").unlink()  # missing
    truncate(root / "val2014" / "3.jpg")  # truncated
    (root / "val2014" / "4.jpg").write_bytes(b"")  # zero bytes
    return root


def test_policy_error_stops_with_the_path(tmp_path):
    root = _set_with_bad_images(tmp_path)
    cfg = DataConfig(root=str(root), image_size=16, num_workers=0, on_bad_image="error")
    s = build_datasets(cfg)
    loader = build_loader(s.test, cfg, 6, train=False, seed=0)
    with pytest.raises(BadImageError, match="1.jpg: file not found"):
        next(iter(loader))


def test_policy_skip_drops_counts_and_logs_once(tmp_path, caplog):
    root = _set_with_bad_images(tmp_path)
    cfg = DataConfig(root=str(root), image_size=16, num_workers=0, on_bad_image="skip")
    s = build_datasets(cfg)
    assert s.test[1] is None
    loader = build_loader(s.test, cfg, 4, train=False, seed=0)
    with caplog.at_level(logging.WARNING, logger="q2l.data.images"):
        for _ in range(2):  # two epochs: still one log line per bad path
            batches = list(loader)
    assert [b.skipped for b in batches] == [2, 1]
    images, targets, indices = batches[0]
    assert images.shape == (2, 3, 16, 16) and indices.tolist() == [0, 2]
    assert batches[1][2].tolist() == [5]
    logged = [r.getMessage() for r in caplog.records if "skipping bad image" in r.getMessage()]
    assert len(logged) == 3 and any("3.jpg: truncated" in m for m in logged)


def test_policy_skip_with_workers(tmp_path):
    root = _set_with_bad_images(tmp_path)
    cfg = DataConfig(root=str(root), image_size=16, num_workers=2, on_bad_image="skip")
    loader = build_loader(build_datasets(cfg).test, cfg, 3, train=False, seed=0)
    batches = list(loader)
    assert sum(b.skipped for b in batches) == 3
    assert torch.cat([b[2] for b in batches]).tolist() == [0, 2, 5]
