"""Decoding real files, the decoding limit and the bad-image policy (error names the file; skip drops it)."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from data_fixtures import (
    claim_jpeg_size,
    make_coco_set,
    truncate,
    write_bomb_png,
    write_jpeg,
    write_png_alpha,
)
from PIL import Image
from support import HANG_GUARD_S

from q2l.config import DataConfig
from q2l.data import BadImageError, build_datasets, build_loader, decode_rgb
from q2l.data.images import DEFAULT_MAX_PIXELS, check_image_size, decode_rgb_bytes

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


BOMB_REFUSED = (
    "image of 16000 x 16000 = 256000000 pixels exceeds the limit of 40000000 (data.max_image_pixels)"
)


@pytest.fixture(scope="module")
def bomb_png(tmp_path_factory):
    """A 275 kB PNG of 16000 x 16000 pixels (768 MB once decoded to RGB)."""
    return write_bomb_png(tmp_path_factory.mktemp("bomb") / "bomb.png")


def test_default_limit_is_the_config_default():
    assert DEFAULT_MAX_PIXELS == DataConfig().max_image_pixels == 40_000_000


def _other_formats(tmp_path):
    tmp_path.mkdir()
    rgb = Image.fromarray(np.zeros((30, 50, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x010E] = "x" * 3000  # a large APP1 segment before the frame header
    rgb.save(tmp_path / "exif.jpg", exif=exif)
    rgb.save(tmp_path / "progressive.jpg", progressive=True)
    for suffix in ("bmp", "gif", "tiff", "webp"):
        rgb.save(tmp_path / f"x.{suffix}")
    return sorted(tmp_path.iterdir())


def test_header_size_is_the_decoded_size(tmp_path):
    paths = [write_jpeg(tmp_path / f"{m}.jpg", h=40, w=48, mode=m) for m in ("RGB", "L", "CMYK")]
    paths += [write_png_alpha(tmp_path / "a.png"), *_other_formats(tmp_path / "more")]
    for path in paths:
        w, h = check_image_size(path.read_bytes(), path)
        assert decode_rgb(path).shape == (3, h, w), path.name
        assert check_image_size(torch.from_numpy(np.fromfile(path, dtype=np.uint8)), path) == (w, h)


def test_oversized_image_is_refused_from_its_header(bomb_png):
    with pytest.raises(BadImageError) as e:
        decode_rgb(bomb_png)
    assert e.value.path == str(bomb_png) and str(e.value) == f"{bomb_png}: {BOMB_REFUSED}"
    with pytest.raises(BadImageError, match=re.escape(f"upload.png: {BOMB_REFUSED}")):
        decode_rgb_bytes(bomb_png.read_bytes(), "upload.png", DEFAULT_MAX_PIXELS)
    # the limit is a parameter: exactly at it passes the header check
    assert check_image_size(bomb_png.read_bytes(), bomb_png, 16000 * 16000) == (16000, 16000)


@pytest.mark.parametrize("suffix", ["jpg", "bmp", "gif"])
def test_limit_applies_to_every_format(tmp_path, suffix):
    path = tmp_path / f"x.{suffix}"
    Image.fromarray(np.zeros((100, 120, 3), dtype=np.uint8)).save(path)
    assert decode_rgb(path, max_pixels=12_000).shape == (3, 100, 120)
    with pytest.raises(BadImageError, match=r"120 x 100 = 12000 pixels exceeds the limit of 11999"):
        decode_rgb(path, max_pixels=11_999)


def test_jpeg_whose_header_claims_a_huge_frame_is_refused(tmp_path):
    path = claim_jpeg_size(write_jpeg(tmp_path / "liar.jpg"), 30000, 30000)
    with pytest.raises(BadImageError, match=r"liar.jpg: image of 30000 x 30000 = 900000000 pixels"):
        decode_rgb(path)


# VmHWM, this process's own peak RSS: getrusage's ru_maxrss would also count the forking parent's size (Linux
# keeps the larger of the two across exec), and pytest's process grows over a whole suite
_PEAK_RSS = """
import sys
from q2l.data.images import BadImageError, decode_rgb
def peak_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
before = peak_kib()
try:
    decode_rgb(sys.argv[1])
    print("decoded")
except BadImageError as e:
    print("refused", e.reason)
print(before, peak_kib())
"""


def test_oversized_image_costs_no_memory(bomb_png):
    # a process that only asks q2l to decode it: its peak RSS stays near what the imports took
    # (decoding it, as torchvision's decode_image did before the header check, peaked at 1410 MiB)
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, str(bomb_png)],
        capture_output=True,
        text=True,
        check=True,
        timeout=HANG_GUARD_S,
    ).stdout.splitlines()
    assert out[0] == f"refused {BOMB_REFUSED}"
    before, peak = (int(x) for x in out[1].split())
    assert peak < 1024 * 1024 and peak - before < 64 * 1024, (before, peak)


def _set_with_bomb(tmp_path, bomb_png):
    images = [("0.jpg", [1]), ("1.jpg", [2]), ("big.png", [1]), ("3.jpg", [2])]
    root = make_coco_set(tmp_path, train=images, test=images, categories=[(1, "a"), (2, "b")])
    shutil.copy(bomb_png, root / "val2014" / "big.png")
    return root


def test_oversized_image_in_a_data_set_error(tmp_path, bomb_png):
    cfg = DataConfig(root=str(_set_with_bomb(tmp_path, bomb_png)), image_size=16, num_workers=0)
    loader = build_loader(build_datasets(cfg).test, cfg, 4, train=False, seed=0)
    with pytest.raises(BadImageError, match=re.escape(f"big.png: {BOMB_REFUSED}")) as e:
        next(iter(loader))
    assert e.value.path.endswith("val2014/big.png")


def test_oversized_image_in_a_data_set_skip(tmp_path, bomb_png, caplog):
    cfg = DataConfig(
        root=str(_set_with_bomb(tmp_path, bomb_png)), image_size=16, num_workers=0, on_bad_image="skip"
    )
    loader = build_loader(build_datasets(cfg).test, cfg, 4, train=False, seed=0)
    with caplog.at_level(logging.WARNING, logger="q2l.data.images"):
        (batch,) = list(loader)
    assert batch.skipped == 1 and batch[2].tolist() == [0, 1, 3]
    assert any("big.png" in r.getMessage() and "16000 x 16000" in r.getMessage() for r in caplog.records)


def test_limit_comes_from_data_config(tmp_path):
    root = make_coco_set(tmp_path, train=[("a.jpg", [1]), ("b.jpg", [1])], categories=[(1, "a")])
    assert build_datasets(DataConfig(root=str(root), image_size=16)).test[0] is not None
    s = build_datasets(DataConfig(root=str(root), image_size=16, max_image_pixels=48 * 40 - 1))
    with pytest.raises(
        BadImageError, match=r"a.jpg: image of 48 x 40 = 1920 pixels exceeds the limit of 1919"
    ):
        s.test[0]
