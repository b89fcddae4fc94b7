"""``q2l predict`` and attention maps: a real checkpoint, real JPEG/PNG files, a corrupt and a truncated one.

The model is a tiny Query2Label (timm ``test_efficientnet``, 64 px) saved the way the train layer saves its
best weights (``best.pt``: state dict, label names, image size, config YAML).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F
from data_fixtures import truncate, write_bomb_png, write_jpeg
from model_fixtures import TINY_ARCH, reference_probs, tiny_model
from PIL import Image

from q2l.config import config_from_dict
from q2l.explain import attention_maps, log_attention_examples
from q2l.models import Query2Label
from q2l.registry.predict import run_predict

LABELS = ["apple", "bike", "cat", "dog"]
SIZE = 64


@pytest.fixture(scope="module")
def model() -> Query2Label:
    torch.set_num_threads(1)
    return tiny_model(0, len(LABELS))


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory) -> Path:
    cfg = config_from_dict(
        {
            "data": {"image_size": SIZE},
            "model": {"backbone": "test_efficientnet", "pretrained": False, **TINY_ARCH},
        }
    )
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    torch.save(
        {"model": model.state_dict(), "label_names": LABELS, "image_size": SIZE, "config": cfg.to_yaml()},
        path,
    )
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """3 readable images (one PNG, one in a subfolder), a corrupt JPEG, a truncated JPEG, a text file."""
    root = tmp_path_factory.mktemp("photos")
    write_jpeg(root / "a.jpg", seed=1, h=50, w=70)
    write_jpeg(root / "sub" / "b.jpeg", seed=2)
    Image.fromarray(np.full((30, 30, 3), 200, dtype=np.uint8)).save(root / "c.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is no JPEG at all")
    truncate(write_jpeg(root / "cut.jpg", seed=3, h=80, w=80), keep=0.3)
    (root / "notes.txt").write_text("not an image, not even looked at")
    return root


def readable(folder: Path) -> list[Path]:
    return [folder / "a.jpg", folder / "c.png", folder / "sub" / "b.jpeg"]


def predict(*args, **kwargs) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run_predict(*args, out=out, err=err, **kwargs)
    return code, out.getvalue(), err.getvalue()


def test_folder_with_corrupt_files_json(checkpoint, folder, model):
    code, out, err = predict(str(checkpoint), [folder], fmt="json", batch_size=2, threshold=0.0)
    assert code == 0
    doc = json.loads(out)
    got = {Path(p["image"]).name: p for p in doc["predictions"]}
    assert sorted(got) == ["a.jpg", "b.jpeg", "c.png"]
    bad = {Path(u["image"]).name: u["error"] for u in doc["unreadable"]}
    assert sorted(bad) == ["broken.jpg", "cut.jpg"]
    assert "truncated" in bad["cut.jpg"]
    assert "broken.jpg" in err and "cut.jpg" in err and "3 image(s) labelled, 2 unreadable" in err
    expected = reference_probs(model, readable(folder), SIZE)
    for row, path in zip(expected, readable(folder), strict=True):
        item = got[path.name]
        np.testing.assert_allclose([item["probabilities"][n] for n in LABELS], row, atol=1e-5)
        # threshold 0: every label, most likely first
        probs = [entry["probability"] for entry in item["labels"]]
        assert len(probs) == len(LABELS) and probs == sorted(probs, reverse=True)


def test_table_and_csv_formats(checkpoint, folder, model):
    code, out, _ = predict(str(checkpoint), [folder / "a.jpg", folder / "c.png"], fmt="table", top_k=2)
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(str(folder / "a.jpg"))
    expected = reference_probs(model, [folder / "a.jpg"], SIZE)[0]
    top2 = [LABELS[k] for k in np.argsort(-expected)[:2]]
    assert [part.split()[0] for part in lines[0].split("  ", 1)[1].strip().split(", ")] == top2

    code, out, _ = predict(str(checkpoint), [folder], fmt="csv", threshold=0.5)
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["image", "predicted", *LABELS] and len(rows) == 4
    for row in rows[1:]:
        probs = [float(v) for v in row[2:]]
        chosen = row[1].split(";") if row[1] else []
        assert chosen == [LABELS[k] for k in np.argsort(-np.array(probs), kind="stable") if probs[k] >= 0.5]


def test_exit_codes(checkpoint, folder, tmp_path):
    code, _, err = predict(str(checkpoint), [folder / "broken.jpg", folder / "missing.jpg"])
    assert code == 1 and "file not found" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = predict(str(checkpoint), [empty])
    assert code == 2 and "no image found" in err
    code, _, err = predict(str(checkpoint), [folder], top_k=0)
    assert code == 2 and "--top-k" in err
    code, _, err = predict(str(tmp_path / "no-model.pt"), [folder])
    assert code == 2 and "no such file" in err
    code, _, err = predict(str(checkpoint), [folder], fmt="xml")
    assert code == 2 and "--format" in err


def test_explain_writes_one_figure_per_readable_image(checkpoint, folder, tmp_path):
    out_dir = tmp_path / "explain"
    code, _, err = predict(str(checkpoint), [folder], explain_dir=out_dir, top_k=2, threshold=0.0)
    assert code == 0 and "3 figure(s)" in err
    figures = sorted(p.name for p in out_dir.iterdir())
    assert figures == ["a.png", "b.png", "c.png"]
    with Image.open(out_dir / "a.png") as im:
        # image + 2 label panels side by side
        assert im.format == "PNG" and im.width > 2.5 * im.height


def squished(path: Path) -> torch.Tensor:
    """PIL decode and an antialiased bilinear resize to SIZE x SIZE, written out here (no q2l data code)."""
    with Image.open(path) as im:
        rgb = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
    return F.resize(rgb, [SIZE, SIZE], antialias=True)


def test_attention_maps_and_training_examples(model, folder, tmp_path):
    images = torch.stack([squished(p) for p in readable(folder)])
    probs, maps = attention_maps(model, images)
    assert probs.shape == (3, len(LABELS)) and maps.shape == (3, len(LABELS), 2, 2)
    # each label's attention is a distribution over the feature grid
    np.testing.assert_allclose(maps.sum(axis=(2, 3)), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs, reference_probs(model, readable(folder), SIZE), atol=1e-5)

    written = log_attention_examples(model, images, LABELS, tmp_path / "attn", max_images=2)
    assert [p.name for p in written] == ["example_000.png", "example_001.png"]
    assert all(Image.open(p).format == "PNG" for p in written)


def test_images_over_the_pixel_budget_are_unreadable(checkpoint, folder, tmp_path):
    """A 16000 x 16000 PNG (~275 kB on disk) is refused from its header, never decoded to 768 MB."""
    bomb = write_bomb_png(tmp_path / "bomb.png")
    code, out, err = predict(str(checkpoint), [bomb, folder / "a.jpg"], fmt="json")
    assert code == 0
    doc = json.loads(out)
    assert [Path(p["image"]).name for p in doc["predictions"]] == ["a.jpg"]
    limit = "16000 x 16000 = 256000000 pixels exceeds the limit of 40000000 (data.max_image_pixels)"
    assert doc["unreadable"] == [{"image": str(bomb), "error": f"image of {limit}"}]
    assert f"unreadable: {bomb}: image of {limit}" in err

    # none readable: exit 1; a smaller budget (data.max_image_pixels) applies to ordinary images too
    code, _, err = predict(str(checkpoint), [bomb], fmt="json")
    assert code == 1 and "0 image(s) labelled, 1 unreadable" in err
    code, _, err = predict(str(checkpoint), [folder / "a.jpg"], max_image_pixels=70 * 50 - 1)
    assert code == 1 and "image of 70 x 50 = 3500 pixels exceeds the limit of 3499" in err


def test_cli_passes_the_configured_budget(checkpoint, folder):
    from typer.testing import CliRunner

    from q2l.cli import app

    args = ["predict", "--model", str(checkpoint), str(folder / "a.jpg")]
    assert CliRunner().invoke(app, args).exit_code == 0
    result = CliRunner().invoke(app, [*args, "--set", "data.max_image_pixels=3000"])
    assert result.exit_code == 1 and "exceeds the limit of 3000" in result.output
