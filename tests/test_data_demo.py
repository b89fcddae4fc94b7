"""The demo set (read by pycocotools, deterministic) and `q2l data demo` / `q2l data validate` end to end."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from data_fixtures import make_coco_set, make_voc_set, truncate, write_jpeg
from pycocotools.coco import COCO
from typer.testing import CliRunner

from q2l.cli import app
from q2l.config import DataConfig
from q2l.data import build_datasets
from q2l.data.demo import CATEGORY_IDS, CLASS_NAMES, DemoSourceError, make_demo_dataset
from q2l.data.validate import validate_dataset

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    summary = make_demo_dataset(out, num_train=40, num_val=20, size=64, seed=5, workers=1)
    return out, summary


def _digest(folder):
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and ".q2l_cache" not in p.parts):
        h.update(f.relative_to(folder).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


def test_pycocotools_reads_the_demo_set(demo):
    out, summary = demo
    assert "40 train + 20 val images at 64 px" in str(summary)
    for split, n in (("train", 40), ("val", 20)):
        coco = COCO(str(out / "annotations" / f"instances_{split}2014.json"))
        assert sorted(coco.getCatIds()) == CATEGORY_IDS and CATEGORY_IDS[-1] > len(CATEGORY_IDS)  # gaps
        assert [coco.cats[c]["name"] for c in CATEGORY_IDS] == CLASS_NAMES
        assert len(coco.getImgIds()) == n
        for img in coco.loadImgs(coco.getImgIds()):
            assert img["file_name"] == f"COCO_{split}2014_{img['id']:012d}.jpg"
            assert (out / f"{split}2014" / img["file_name"]).is_file()
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
            assert len(anns) <= 4
            for a in anns:
                x, y, w, h = a["bbox"]
                assert (
                    x >= 0 and y >= 0 and x + w <= 64 and y + h <= 64 and a["iscrowd"] == 0 and a["area"] > 0
                )


def test_labels_equal_annotations_for_every_image(demo):
    out, _ = demo
    s = build_datasets(DataConfig(root=str(out), image_size=32, holdout_fraction=0.25))
    coco = COCO(str(out / "annotations" / "instances_train2014.json"))
    by_name = {im["file_name"]: im["id"] for im in coco.dataset["images"]}
    for ds in (s.train, s.holdout):
        for key, row in zip(ds.keys, ds.targets, strict=True):
            cats = {a["category_id"] for a in coco.loadAnns(coco.getAnnIds(imgIds=by_name[key]))}
            assert {CATEGORY_IDS[k] for k in row.nonzero().flatten().tolist()} == cats
    assert len(s.train) + len(s.holdout) == 40 and len(s.test) == 20


def test_deterministic_per_seed_and_worker_count(demo, tmp_path):
    out, _ = demo
    again = make_demo_dataset(tmp_path / "again", num_train=40, num_val=20, size=64, seed=5, workers=2)
    assert _digest(tmp_path / "again") == _digest(out)
    assert again.num_objects == demo[1].num_objects
    make_demo_dataset(tmp_path / "other", num_train=40, num_val=20, size=64, seed=6, workers=1)
    assert _digest(tmp_path / "other") != _digest(out)


def test_missing_fashion_mnist_says_what_to_install(tmp_path):
    with pytest.raises(DemoSourceError, match="apt-get install dataset-fashion-mnist"):
        make_demo_dataset(tmp_path / "x", num_train=2, num_val=2, size=32, source=tmp_path / "nothing")


def test_cli_demo_then_validate_exit_zero(tmp_path):
    runner = CliRunner()
    out = tmp_path / "demo"
    r = runner.invoke(app, ["data", "demo", "--out", str(out), "--train", "12", "--val", "6", "--size", "48"])
    assert r.exit_code == 0, r.output
    assert "12 train + 6 val images at 48 px" in r.output
    r = runner.invoke(app, ["data", "validate", "--root", str(out)])
    assert r.exit_code == 0, r.output
    assert "0 problem(s)" in r.output
    ann = out / "annotations" / "instances_val2014.json"
    r = runner.invoke(app, ["data", "validate", "--annotations", str(ann), "--images", str(out / "val2014")])
    assert r.exit_code == 0, r.output


def test_validate_lists_every_coco_problem(tmp_path):
    root = make_coco_set(tmp_path, train=[("a.jpg", [1]), ("b.jpg", [3]), ("c.jpg", []), ("d.jpg", [1])])
    ann = root / "annotations" / "instances_train2014.json"
    doc = json.loads(ann.read_text())
    doc["annotations"].append({"id": 90, "image_id": 10, "category_id": 99, "bbox": [0, 0, 1, 1]})
    doc["annotations"].append({"id": 91, "image_id": 777, "category_id": 1, "bbox": [0, 0, 1, 1]})
    ann.write_text(json.dumps(doc))
    images = root / "train2014"
    (images / "a.jpg").unlink()
    truncate(images / "b.jpg")
    (images / "c.jpg").write_bytes(b"")
    problems = validate_dataset(format="coco", annotations=ann, images=images)
    text = "\n".join(map(str, problems))
    assert len(problems) == 5, text
    assert "unknown category_id 99" in text and "missing image_id 777" in text
    assert f"{images / 'a.jpg'}: file not found" in text
    assert f"{images / 'b.jpg'}: truncated" in text
    assert f"{images / 'c.jpg'}: empty file" in text
    r = CliRunner().invoke(app, ["data", "validate", "--annotations", str(ann), "--images", str(images)])
    assert r.exit_code == 1 and "5 problem(s)" in r.output


def test_validate_malformed_json_voc_and_csv(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [}')
    (p,) = validate_dataset(format="coco", annotations=bad, images=tmp_path)
    assert p.path == str(bad) and "line 1, column 13" in p.what

    voc = make_voc_set(tmp_path / "VOC2007")
    (voc / "Annotations" / "000003.xml").write_text("<annotation><object></annotation>")
    (voc / "JPEGImages" / "000004.jpg").unlink()
    text = "\n".join(map(str, validate_dataset(format="voc", root=voc)))
    assert "000003.xml: malformed XML at line 1" in text and "000004.jpg: file not found" in text

    write_jpeg(tmp_path / "i" / "ok.jpg")
    csv = tmp_path / "list.csv"
    csv.write_text("image,labels\ni/ok.jpg,cat\ni/gone.jpg,dog\ni/ok.jpg,cat,dog,extra\n")
    problems = validate_dataset(format="csv", annotations=csv, images=tmp_path)
    text = "\n".join(map(str, problems))
    assert (
        len(problems) == 2 and f"{csv}:4: expected 2 columns" in text and "gone.jpg: file not found" in text
    )


def test_validate_lists_malformed_ids_without_a_traceback(tmp_path):
    root = make_coco_set(tmp_path, train=[("a.jpg", [1]), ("b.jpg", [3]), ("c.jpg", [1])])
    ann = root / "annotations" / "instances_train2014.json"
    doc = json.loads(ann.read_text())
    doc["annotations"][0]["category_id"] = [1]
    doc["annotations"][1]["image_id"] = "20"
    del doc["annotations"][2]["category_id"]
    doc["images"][2]["id"] = 30.0
    doc["categories"].append({"id": 4, "name": "cat"})  # a second category named "cat"
    ann.write_text(json.dumps(doc))
    (root / "train2014" / "b.jpg").unlink()
    r = CliRunner().invoke(
        app, ["data", "validate", "--annotations", str(ann), "--images", str(root / "train2014")]
    )
    assert r.exit_code == 1, r.output
    lines = r.stdout.splitlines()
    assert lines[-1] == "6 problem(s)", r.output
    assert f"{ann}: annotations[0] (id 1): category_id must be an integer, got [1]" in lines
    assert f'{ann}: annotations[1] (id 2): image_id must be an integer, got "20"' in lines
    assert f"{ann}: annotations[2] (id 3): missing 'category_id'" in lines
    assert f"{ann}: images[2]: id must be an integer, got 30.0" in lines
    assert f"{ann}: duplicate category names (each category becomes one label)" in lines
    assert f"{root / 'train2014' / 'b.jpg'}: file not found" in lines  # images are still checked


def test_validate_labels_and_image_limit(tmp_path):
    write_jpeg(tmp_path / "ok.jpg")  # 48 x 40
    csv = tmp_path / "list.csv"
    csv.write_text("image,labels\nok.jpg,cat\nok.jpg,cat|7\n")
    problems = validate_dataset(format="csv", annotations=csv, images=tmp_path, max_pixels=1000)
    too_big = "image of 48 x 40 = 1920 pixels exceeds the limit of 1000 (data.max_image_pixels)"
    assert [str(p) for p in problems] == [
        f"{csv}:3: label '7' looks like a class index while the other labels are names; write its name,"
        " or declare the label set (a header of label columns)",
        f"{tmp_path / 'ok.jpg'}: {too_big}",
    ]
    r = CliRunner().invoke(app, ["data", "validate", "--format", "csv", "--annotations", str(csv)])
    assert r.exit_code == 1 and "1 problem(s)" in r.output  # the default limit lets 48 x 40 through
    args = ["data", "validate", "--format", "csv", "--annotations", str(csv), "--max-image-pixels", "1000"]
    assert "2 problem(s)" in CliRunner().invoke(app, args).output


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--format", "xyz", "--annotations", "a.json"], "--format 'xyz' must be one of coco, voc, csv"),
        (["--annotations", "a.json"], "--images (the image folder) is required with --annotations"),
        (["--format", "voc"], "--root (the VOC2007 folder) is required for --format voc"),
    ],
)
def test_validate_bad_arguments_are_usage_errors(args, words):
    r = CliRunner().invoke(app, ["data", "validate", *args])
    assert r.exit_code == 2 and words in r.output and "problem(s)" not in r.output
