"""Pascal VOC 2007 and CSV/JSONL readers through build_datasets, with their malformed-input errors."""

from __future__ import annotations

import json

import pytest
import torch
from data_fixtures import make_voc_set, write_jpeg

from q2l.config import DataConfig
from q2l.data import DataError, build_datasets
from q2l.data.voc import load_voc

torch.set_num_threads(1)


def test_voc_labels_difficult_excluded_by_default(tmp_path):
    root = make_voc_set(tmp_path / "VOC2007")
    train, test = load_voc(root)
    assert train.label_names == ["cat", "dog", "person"]
    assert train.keys == ["000001.jpg", "000002.jpg", "000003.jpg"]
    assert train.targets.tolist() == [[0, 1, 1], [1, 0, 0], [0, 0, 1]]  # 000002's dog is difficult
    assert test.targets.tolist() == [[1, 0, 0], [0, 1, 0]]
    train_d, test_d = load_voc(root, include_difficult=True)
    assert train_d.targets.tolist()[1] == [1, 1, 0] and test_d.targets.tolist()[1] == [1, 1, 0]


def test_voc_build_datasets(tmp_path):
    root = make_voc_set(tmp_path / "VOC2007")
    s = build_datasets(DataConfig(root=str(root), format="voc", image_size=24, holdout_fraction=0.34))
    assert len(s.train) + len(s.holdout) == 3 and len(s.test) == 2
    assert s.test[1][0].shape == (3, 24, 24)


def test_voc_malformed_xml_names_file_and_line(tmp_path):
    root = make_voc_set(tmp_path / "VOC2007")
    bad = root / "Annotations" / "000002.xml"
    bad.write_text("<annotation>\n<object><name>dog</name></objekt>\n</annotation>")
    with pytest.raises(DataError) as e:
        load_voc(root)
    assert str(bad) in str(e.value) and "line 2" in str(e.value)


def _images(root, names):
    for k, n in enumerate(names):
        write_jpeg(root / n, seed=k)


def test_csv_pipe_and_json_lists_sorted_union(tmp_path):
    _images(tmp_path, ["i/1.jpg", "i/2.jpg", "i/3.jpg", "i/4.jpg"])
    (tmp_path / "train.csv").write_text('image,labels\ni/1.jpg,dog|cat\ni/2.jpg,"[""bird""]"\ni/3.jpg,\n')
    (tmp_path / "test.csv").write_text("i/4.jpg,cat\n")  # no header
    cfg = DataConfig(
        root=str(tmp_path), format="csv", train_file=str(tmp_path / "train.csv"),
        test_file=str(tmp_path / "test.csv"), image_size=16, holdout_fraction=0.34,
    )  # fmt: skip
    s = build_datasets(cfg)
    assert s.label_names == ["bird", "cat", "dog"]
    rows = dict(
        zip(s.train.keys + s.holdout.keys, s.train.targets.tolist() + s.holdout.targets.tolist(), strict=True)
    )
    assert rows == {"i/1.jpg": [0, 1, 1], "i/2.jpg": [1, 0, 0], "i/3.jpg": [0, 0, 0]}
    assert s.test.targets.tolist() == [[0, 1, 0]]
    assert s.test.paths == [str(tmp_path / "i/4.jpg")]


def test_csv_wide_header_gives_names_and_unknowns(tmp_path):
    _images(tmp_path, ["1.jpg", "2.jpg", "3.jpg"])
    (tmp_path / "train.csv").write_text("image,zeta,alpha\n1.jpg,1,0\n2.jpg,-1,1\n")
    (tmp_path / "test.csv").write_text("image,zeta,alpha\n3.jpg,,1\n")
    cfg = DataConfig(
        root=str(tmp_path), format="csv", train_file=str(tmp_path / "train.csv"),
        test_file=str(tmp_path / "test.csv"), image_size=16,
    )  # fmt: skip
    s = build_datasets(cfg)
    assert s.label_names == ["zeta", "alpha"]  # header order kept
    assert s.test.targets.tolist() == [[-1.0, 1.0]]


def test_jsonl_with_declared_names(tmp_path):
    _images(tmp_path, ["1.jpg", "2.jpg", "3.jpg"])
    lines = [
        {"label_names": ["x", "y", "z"]},
        {"image": "1.jpg", "labels": ["y"]},
        {"image": "2.jpg", "labels": []},
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    (tmp_path / "test.jsonl").write_text(json.dumps({"image": "3.jpg", "labels": ["z", "x"]}))
    cfg = DataConfig(
        root=str(tmp_path), format="csv", train_file=str(tmp_path / "train.jsonl"),
        test_file=str(tmp_path / "test.jsonl"), image_size=16,
    )  # fmt: skip
    s = build_datasets(cfg)
    assert s.label_names == ["x", "y", "z"] and s.test.targets.tolist() == [[1, 0, 1]]


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        ("train.csv", "image,labels\na.jpg,cat\nb.jpg,cat,dog\n", ":3: expected 2 columns"),
        ("train.csv", "image,cat,dog\na.jpg,1,2\n", ":2: label 'dog' value '2'"),
        (
            "train.jsonl",
            '{"image": "a.jpg", "labels": ["x"]}\n{"image": "b.jpg", "labels": [}\n',
            ":2: malformed JSON",
        ),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, name, text, where):
    (tmp_path / name).write_text(text)
    (tmp_path / "test.csv").write_text("c.jpg,cat\n")
    cfg = DataConfig(
        root=str(tmp_path),
        format="csv",
        train_file=str(tmp_path / name),
        test_file=str(tmp_path / "test.csv"),
    )
    with pytest.raises(DataError) as e:
        build_datasets(cfg)
    assert f"{tmp_path / name}{where}" in str(e.value)


def _csv_config(tmp_path, train_text, test_text):
    (tmp_path / "train.csv").write_text(train_text)
    (tmp_path / "test.csv").write_text(test_text)
    return DataConfig(
        root=str(tmp_path), format="csv", train_file=str(tmp_path / "train.csv"),
        test_file=str(tmp_path / "test.csv"), image_size=16,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("train", "test", "where", "words"),
    [
        # declared names (a header of label columns): an index is not a name
        (
            "image,cat,dog\na.jpg,1,0\n",
            "image,labels\nb.jpg,cat\nc.jpg,99\n",
            "test.csv:3",
            "label '99' is not among the declared label names (labels are written as names, not as indices)",
        ),
        # no declared names: the training file's labels are the set
        (
            "a.jpg,cat|dog\n",
            "b.jpg,dog\nc.jpg,bird\n",
            "test.csv:2",
            "label 'bird' does not occur in the training",
        ),
        # no declared names: an index among names
        (
            "image,labels\na.jpg,cat\nb.jpg,dog|99\n",
            "c.jpg,cat\n",
            "train.csv:3",
            "label '99' looks like a class index",
        ),
    ],
    ids=["declared", "test-only", "index-among-names"],
)
def test_labels_outside_the_label_set_name_file_and_line(tmp_path, train, test, where, words):
    with pytest.raises(DataError) as e:
        build_datasets(_csv_config(tmp_path, train, test))
    assert f"{tmp_path / where}: {words}" in str(e.value)


def test_labels_that_are_all_numbers_are_names(tmp_path):
    _images(tmp_path, ["a.jpg", "b.jpg", "c.jpg"])
    s = build_datasets(_csv_config(tmp_path, "a.jpg,3|17\nb.jpg,17\n", "c.jpg,3\n"))
    assert s.label_names == ["17", "3"] and s.test.targets.tolist() == [[0, 1]]
