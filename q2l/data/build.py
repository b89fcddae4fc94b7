"""``build_datasets``: read the configured format, carve the held-out split, apply caps, build datasets."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from q2l.config import DataConfig
from q2l.data.cache import ResizedCache
from q2l.data.coco import load_coco
from q2l.data.dataset import MultiLabelDataset
from q2l.data.splits import cap, holdout_split
from q2l.data.table import DataError, LabelTable, label_cache_dir
from q2l.data.tabular import load_tabular
from q2l.data.transforms import Augment
from q2l.data.voc import load_voc


@dataclass
class DataSplits:
    """Training set (augmented), held-out set carved from it, and the official evaluation set as test."""

    train: MultiLabelDataset
    holdout: MultiLabelDataset
    test: MultiLabelDataset
    label_names: list[str]
    fingerprint: str

    @property
    def num_classes(self) -> int:
        """Number of labels K."""
        return len(self.label_names)


def coco_paths(cfg: DataConfig) -> tuple[Path, Path, Path, Path]:
    """``(train_annotations, train_images, test_annotations, test_images)``, COCO 2014 layout by default."""
    root = Path(cfg.root)
    return (
        Path(cfg.train_annotations)
        if cfg.train_annotations
        else root / "annotations" / "instances_train2014.json",
        Path(cfg.train_images) if cfg.train_images else root / "train2014",
        Path(cfg.test_annotations)
        if cfg.test_annotations
        else root / "annotations" / "instances_val2014.json",
        Path(cfg.test_images) if cfg.test_images else root / "val2014",
    )


def read_tables(cfg: DataConfig) -> tuple[LabelTable, LabelTable]:
    """The training and test ``LabelTable`` s of the configured format."""
    if cfg.format == "coco":
        train_ann, train_img, test_ann, test_img = coco_paths(cfg)
        for key, path in (("data.train_annotations", train_ann), ("data.test_annotations", test_ann)):
            if not path.is_file():
                hint = (
                    " (make the demo set with `q2l data demo --out DIR`)"
                    if not Path(cfg.root).exists()
                    else ""
                )
                raise DataError(f"{path}: annotation file not found ({key}, data.root = {cfg.root}){hint}")
        cache = label_cache_dir(cfg.root, cfg.cache_dir)
        kw = {"include_unannotated": cfg.include_unannotated, "cache_dir": cache}
        train, test = load_coco(train_ann, train_img, **kw), load_coco(test_ann, test_img, **kw)
        if train.label_names != test.label_names:
            raise DataError(f"{train_ann} and {test_ann} have different categories")
        return train, test
    if cfg.format == "voc":
        return load_voc(cfg.root, include_difficult=cfg.voc_include_difficult)
    if cfg.format == "csv":
        if not cfg.train_file:
            raise DataError("data.train_file is required for data.format = 'csv'")
        return load_tabular(
            cfg.train_file, cfg.test_file, cfg.root, include_unannotated=cfg.include_unannotated
        )
    raise DataError(f"data.format = {cfg.format!r} is not one of coco, voc, csv")


def fingerprint(cfg: DataConfig, train: LabelTable, test: LabelTable) -> str:
    """Short hex sha256 over the annotation content and every parameter that changes the splits' members."""
    params = {
        "format": cfg.format,
        "annotations": [train.content_hash, test.content_hash],
        "holdout_fraction": cfg.holdout_fraction,
        "split_seed": cfg.split_seed,
        "include_unannotated": cfg.include_unannotated,
        "voc_include_difficult": cfg.voc_include_difficult,
        "max_train_images": cfg.max_train_images,
        "max_eval_images": cfg.max_eval_images,
    }
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def build_datasets(data_cfg: DataConfig, train: bool = True) -> DataSplits:
    """Build train (augmented when ``train``), holdout and test datasets from ``data_cfg``.

    ``train=False`` builds the same three splits without augmentation (evaluation, feature extraction).
    Raises ``DataError`` for missing or malformed annotations and for an empty training or test set.
    """
    cfg = data_cfg
    train_table, test_table = read_tables(cfg)
    if len(train_table) == 0:
        raise DataError(f"the training set is empty (data.format = {cfg.format}, data.root = {cfg.root})")
    if len(test_table) == 0:
        raise DataError(f"the test set is empty (data.format = {cfg.format}, data.root = {cfg.root})")
    train_idx, holdout_idx = holdout_split(train_table.keys, cfg.holdout_fraction, cfg.split_seed)
    train_idx = cap(train_idx, train_table.keys, cfg.max_train_images, cfg.split_seed)
    holdout_idx = cap(holdout_idx, train_table.keys, cfg.max_eval_images, cfg.split_seed)
    test_idx = cap(np.arange(len(test_table)), test_table.keys, cfg.max_eval_images, cfg.split_seed)
    augment = Augment(randaugment=cfg.randaugment, cutout=cfg.cutout, hflip=cfg.hflip) if train else None

    def make(table: LabelTable, indices: np.ndarray, aug: Augment | None) -> MultiLabelDataset:
        part = table.subset(indices)
        cache = ResizedCache(cfg.cache_dir, part.paths, cfg.image_size) if cfg.cache_dir else None
        return MultiLabelDataset(
            part.paths,
            part.targets,
            part.label_names,
            cfg.image_size,
            augment=aug,
            on_bad_image=cfg.on_bad_image,
            cache=cache,
            keys=part.keys,
            max_pixels=cfg.max_image_pixels,
        )

    return DataSplits(
        train=make(train_table, train_idx, augment),
        holdout=make(train_table, holdout_idx, None),
        test=make(test_table, test_idx, None),
        label_names=train_table.label_names,
        fingerprint=fingerprint(cfg, train_table, test_table),
    )
