"""COCO reader and build_datasets: labels from annotations, id mapping, cache, errors, splits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from data_fixtures import COCO_IMAGES, coco_doc, make_coco_set

import q2l.data.coco as coco_mod
from q2l.config import DataConfig
from q2l.data import DataError, build_datasets
from q2l.data.coco import load_coco

torch.set_num_threads(1)


def test_labels_equal_annotations_with_sorted_gapped_ids(tmp_path):
    root = make_coco_set(tmp_path)
    table = load_coco(root / "annotations/instances_train2014.json", root / "train2014", cache_dir=None)
    assert table.label_names == ["apple", "cat", "dog", "zebra"]  # ids 1, 3, 7, 12 in sorted order
    index_of = {1: 0, 3: 1, 7: 2, 12: 3}
    assert table.keys == [name for name, _ in COCO_IMAGES]  # unannotated d.jpg included
    for key, row in zip(table.keys, table.targets, strict=True):
        cats = dict(COCO_IMAGES)[key]
        expected = np.zeros(4, dtype=np.int8)
        expected[[index_of[c] for c in cats]] = 1
        assert row.tolist() == expected.tolist(), key
    assert table.paths[0] == str(root / "train2014" / "a.jpg")


def test_unannotated_can_be_excluded(tmp_path):
    root = make_coco_set(tmp_path)
    table = load_coco(
        root / "annotations/instances_train2014.json", root / "train2014", include_unannotated=False
    )
    assert "d.jpg" not in table.keys and len(table) == 3


def test_label_cache_keyed_by_content_hash(tmp_path, monkeypatch):
    root = make_coco_set(tmp_path)
    ann = root / "annotations/instances_train2014.json"
    cache = tmp_path / "cache"
    first = load_coco(ann, root / "train2014", cache_dir=cache)
    assert len(list(cache.glob("labels-*.npz"))) == 1

    def fail(*a, **k):
        raise AssertionError("parsed again despite a cache hit")

    monkeypatch.setattr(coco_mod, "_parse", fail)
    second = load_coco(ann, root / "train2014", cache_dir=cache)
    assert second.keys == first.keys and (second.targets == first.targets).all()
    # changed content → new key → parsed again
    doc = coco_doc()
    doc["annotations"].pop()
    ann.write_text(json.dumps(doc))
    with pytest.raises(AssertionError, match="parsed again"):
        load_coco(ann, root / "train2014", cache_dir=cache)


def test_malformed_json_names_file_and_position(tmp_path):
    root = make_coco_set(tmp_path)
    ann = root / "annotations/instances_train2014.json"
    ann.write_text('{"images": [\n  {"id": 1,, "file_name": "a.jpg"}]}')
    with pytest.raises(DataError) as e:
        build_datasets(DataConfig(root=str(root), image_size=32))
    msg = str(e.value)
    assert str(ann) in msg and "line 2" in msg and "column" in msg


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [("category_id", 99, "unknown category_id 99"), ("image_id", 12345, "missing image_id 12345")],
)
def test_unknown_category_or_image_is_an_error(tmp_path, field, value, words):
    root = make_coco_set(tmp_path)
    ann = root / "annotations/instances_train2014.json"
    doc = coco_doc()
    doc["annotations"][0][field] = value
    ann.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=words) as e:
        build_datasets(DataConfig(root=str(root), image_size=32))
    assert str(ann) in str(e.value)


def test_empty_set_is_a_clear_error(tmp_path):
    root = make_coco_set(tmp_path, train=[])
    with pytest.raises(DataError, match="training set is empty"):
        build_datasets(DataConfig(root=str(root), image_size=32))


def test_missing_annotation_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="instances_train2014.json: annotation file not found"):
        build_datasets(DataConfig(root=str(tmp_path / "nowhere"), image_size=32))


def _many(n: int, prefix: str = "img") -> list[tuple[str, list[int]]]:
    return [(f"{prefix}{i:03d}.jpg", [1 + 2 * (i % 3)]) for i in range(n)]


def test_build_datasets_items_and_disjoint_splits(tmp_path):
    root = make_coco_set(
        tmp_path, train=_many(20), test=_many(6, "val"), categories=[(1, "a"), (3, "b"), (5, "c")]
    )
    cfg = DataConfig(root=str(root), image_size=32, holdout_fraction=0.25, split_seed=3)
    s = build_datasets(cfg)
    assert (len(s.train), len(s.holdout), len(s.test)) == (15, 5, 6)
    assert s.num_classes == 3 and s.label_names == ["a", "b", "c"]
    assert not set(s.train.keys) & set(s.holdout.keys)
    assert set(s.train.keys) | set(s.holdout.keys) == {k for k, _ in _many(20)}
    img, target, index = s.train[2]
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32)
    assert target.dtype == torch.float32 and target.tolist() == s.train.targets[2].tolist() and index == 2
    assert s.train.augment is not None and s.holdout.augment is None and s.test.augment is None
    # the same config gives the same splits and fingerprint; another split seed changes both
    again = build_datasets(cfg)
    assert again.holdout.keys == s.holdout.keys and again.fingerprint == s.fingerprint
    other = build_datasets(DataConfig(root=str(root), image_size=32, holdout_fraction=0.25, split_seed=4))
    assert other.fingerprint != s.fingerprint and other.holdout.keys != s.holdout.keys
    assert build_datasets(cfg, train=False).train.augment is None


def test_caps_are_deterministic_subsets(tmp_path):
    root = make_coco_set(
        tmp_path, train=_many(20), test=_many(9, "val"), categories=[(1, "a"), (3, "b"), (5, "c")]
    )
    cfg = DataConfig(root=str(root), image_size=32, max_train_images=5, max_eval_images=2)
    s, t = build_datasets(cfg), build_datasets(cfg)
    assert (len(s.train), len(s.holdout), len(s.test)) == (5, 2, 2)
    assert s.train.keys == t.train.keys and s.test.keys == t.test.keys
    assert not set(s.train.keys) & set(s.holdout.keys)


def test_class_without_positive_in_eval_split_is_fine(tmp_path):
    train = [("t0.jpg", [1]), ("t1.jpg", [3]), ("t2.jpg", [1, 3])]
    root = make_coco_set(tmp_path, train=train, test=[("v0.jpg", [1])], categories=[(1, "a"), (3, "b")])
    s = build_datasets(DataConfig(root=str(root), image_size=32))
    assert s.test.targets[:, 1].sum() == 0  # class "b" has no positive: built anyway, metrics report it
    assert s.test[0][1].tolist() == [1.0, 0.0]


@pytest.mark.parametrize(
    ("kind", "field", "value", "words"),
    [
        ("annotations", "category_id", [1], "annotations[0] (id 1): category_id must be an integer, got [1]"),
        ("annotations", "category_id", "3", 'annotations[0] (id 1): category_id must be an integer, got "3"'),
        ("annotations", "category_id", 3.0, "annotations[0] (id 1): category_id must be an integer, got 3.0"),
        ("annotations", "category_id", None, "annotations[0] (id 1): missing 'category_id'"),
        ("annotations", "image_id", "10", 'annotations[0] (id 1): image_id must be an integer, got "10"'),
        ("annotations", "image_id", True, "annotations[0] (id 1): image_id must be an integer, got true"),
        ("images", "id", 10.5, "images[0]: id must be an integer, got 10.5"),
        ("images", "file_name", 7, "images[0]: file_name must be a non-empty string, got 7"),
        ("categories", "id", [12], "categories[0]: id must be an integer, got [12]"),
    ],
)
def test_malformed_ids_name_the_file_and_the_entry(tmp_path, kind, field, value, words):
    root = make_coco_set(tmp_path)
    ann = root / "annotations/instances_train2014.json"
    doc = coco_doc()
    if value is None:
        del doc[kind][0][field]
    else:
        doc[kind][0][field] = value
    ann.write_text(json.dumps(doc))
    with pytest.raises(DataError) as e:
        build_datasets(DataConfig(root=str(root), image_size=32))
    assert str(e.value) == f"{ann}: {words}"


def test_every_malformed_entry_is_counted(tmp_path):
    root = make_coco_set(tmp_path)
    ann = root / "annotations/instances_train2014.json"
    doc = coco_doc()
    doc["annotations"][0]["category_id"] = [3]
    doc["annotations"][2]["image_id"] = "x"
    doc["annotations"].append("not an object")
    ann.write_text(json.dumps(doc))
    with pytest.raises(
        DataError, match=r"annotations\[0\] \(id 1\).*\(and 2 more; run `q2l data validate`\)"
    ):
        load_coco(ann, root / "train2014")
