"""The configuration's schema: one dataclass per section, every key with its type, default and range."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem, naming the key and the file it came from."""


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False):
    return {"range": (lo, hi, lo_open, hi_open)}


@dataclass
class DataConfig:
    """Where the images and labels are, how they are split and augmented, how they are loaded."""

    root: str = "data/demo"
    format: Literal["coco", "voc", "csv"] = "coco"
    # COCO layout under root unless given: train2014/, val2014/, annotations/instances_{train,val}2014.json
    train_annotations: str | None = None
    train_images: str | None = None
    test_annotations: str | None = None
    test_images: str | None = None
    # CSV/JSONL (format=csv): files listing image path + labels, relative paths resolved against root
    train_file: str | None = None
    test_file: str | None = None
    include_unannotated: bool = True
    voc_include_difficult: bool = False
    image_size: int = field(default=224, metadata=_range(16, 2048))
    holdout_fraction: float = field(default=0.1, metadata=_range(0.0, 0.9, lo_open=True))
    split_seed: int = 0
    on_bad_image: Literal["error", "skip"] = "error"
    # decoding limit, checked from the image header before any pixel is decoded (decompression bombs)
    max_image_pixels: int = field(default=40_000_000, metadata=_range(1))
    num_workers: int | None = field(default=None, metadata=_range(0, 64))
    # "device": loader workers only read file bytes; JPEG decode (nvJPEG via torchvision.io.decode_jpeg on
    # CUDA), resize and augmentation run on the training device, for GPU nodes short of CPU cores
    decode: Literal["loader", "device"] = "loader"
    cache_dir: str | None = None
    randaugment: bool = True
    cutout: float = field(default=0.5, metadata=_range(0.0, 1.0))
    hflip: bool = False
    cutmix_alpha: float = field(default=0.0, metadata=_range(0.0))
    mixup_alpha: float = field(default=0.0, metadata=_range(0.0))
    mix_prob: float = field(default=1.0, metadata=_range(0.0, 1.0))
    max_train_images: int | None = field(default=None, metadata=_range(1))
    max_eval_images: int | None = field(default=None, metadata=_range(1))


@dataclass
class ModelConfig:
    """Query2Label architecture (docs/design.md §2)."""

    backbone: str = "tf_efficientnet_lite0"
    pretrained: bool = True
    pretrained_path: str | None = None
    hidden_dim: int = field(default=256, metadata=_range(8, 8192))
    num_heads: int = field(default=8, metadata=_range(1, 64))
    enc_layers: int = field(default=1, metadata=_range(0, 12))
    dec_layers: int = field(default=2, metadata=_range(1, 12))
    dim_feedforward: int = field(default=1024, metadata=_range(8, 32768))
    dropout: float = field(default=0.1, metadata=_range(0.0, 1.0, hi_open=True))
    decoder_self_attn: bool = False
    activation_checkpointing: bool = False


@dataclass
class LossConfig:
    """Asymmetric loss (docs/design.md §3); Q2L's recipe by default."""

    gamma_neg: float = field(default=2.0, metadata=_range(0.0, 10.0))
    gamma_pos: float = field(default=0.0, metadata=_range(0.0, 10.0))
    clip: float = field(default=0.0, metadata=_range(0.0, 1.0, hi_open=True))
    eps: float = field(default=1e-5, metadata=_range(0.0, 1.0, lo_open=True))
    partial_labels: bool = False


@dataclass
class OptimConfig:
    """AdamW + OneCycleLR stepped per batch (docs/design.md §6)."""

    lr: float = field(default=1e-4, metadata=_range(0.0, 10.0, lo_open=True))
    weight_decay: float = field(default=1e-2, metadata=_range(0.0))
    pct_start: float = field(default=0.2, metadata=_range(0.0, 1.0, lo_open=True, hi_open=True))
    grad_clip: float | None = field(default=None, metadata=_range(0.0, lo_open=True))
    fused: bool | None = None  # None: fused AdamW on CUDA, plain elsewhere


@dataclass
class TrainConfig:
    """The engine's loop: epochs, batch, precision, EMA, early stopping."""

    epochs: int = field(default=80, metadata=_range(1, 10000))
    batch_size: int = field(default=64, metadata=_range(1, 65536))  # per worker
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool | None = None  # None: on (NHWC is faster in oneDNN and cuDNN; see train_step_bench)
    ema_decay: float | None = field(default=0.9997, metadata=_range(0.0, 1.0, hi_open=True))
    early_stop_patience: int | None = field(default=8, metadata=_range(1))
    grad_accum_steps: int = field(default=1, metadata=_range(1, 1024))
    compile: bool = False
    seed: int = 0


@dataclass
class RayConfig:
    """Ray Train scaling, storage and fault tolerance."""

    num_workers: int = field(default=2, metadata=_range(1, 4096))
    use_gpu: bool = False
    cpus_per_worker: float = field(default=1.0, metadata=_range(0.0, 256.0))
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    storage_path: str = "results/ray"
    run_name: str | None = None
    max_failures: int = field(default=2, metadata=_range(-1, 1000))
    keep_checkpoints: int = field(default=2, metadata=_range(1, 1000))


@dataclass
class TuneConfig:
    """A sweep: search space over any config key, searcher, scheduler, concurrency."""

    name: str | None = None
    num_samples: int = field(default=8, metadata=_range(1, 100000))
    max_concurrent_trials: int | None = field(default=None, metadata=_range(1, 4096))
    searcher: Literal["optuna", "gp", "random"] = "optuna"  # optuna: TPE; gp: Gaussian process
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = field(default=1, metadata=_range(1))
    reduction_factor: float = field(default=2.0, metadata=_range(1.0, lo_open=True))
    seed: int = 0
    space: dict[str, Any] = field(default_factory=dict)
    # the Optuna study's RDB URL; unset: sqlite:///<mlflow.results_dir>/optuna/optuna.db
    storage: str | None = None
    # a sweep name (or a list): its study's finished and pruned trials seed this sweep's study
    warm_start: Any = None


@dataclass
class MlflowConfig:
    """Where runs are recorded; unset tracking_uri means a store under the results folder."""

    tracking_uri: str | None = None
    experiment: str = "q2l"
    registered_model: str | None = None
    log_model: bool = True
    results_dir: str = "results"


@dataclass
class PromoteConfig:
    """The gate a candidate model must pass to become champion."""

    min_map: float = field(default=0.0, metadata=_range(0.0, 100.0))
    min_delta: float = field(default=0.0, metadata=_range(-100.0, 100.0))
    max_class_drop: float = field(default=100.0, metadata=_range(0.0, 100.0))
    split: Literal["test", "holdout"] = "test"


@dataclass
class Config:
    """The whole run: every section, resolved."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML-serialisable)."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The resolved config as YAML, loadable by ``load_config``."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """``{"section.key": value}`` for every key (nested dicts stay as one value)."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}

    def replace(self, overrides: dict[str, Any], source: str = "<overrides>") -> Config:
        """A new validated config with dotted-key overrides applied (values already typed)."""
        raw = self.to_dict()
        from q2l.config.validate import config_from_dict

        for key, value in overrides.items():
            _set_dotted(raw, key, value, source)
        return config_from_dict(raw, source)


def _set_dotted(raw: dict, key: str, value: Any, source: str) -> None:
    section, _, name = key.partition(".")
    if not name or section not in raw:
        raise ConfigError(f"{source}: unknown key {key!r} (expected section.key, sections: {', '.join(raw)})")
    if name not in raw[section]:
        raise ConfigError(f"{source}: unknown key {key!r} (known in {section}: {', '.join(raw[section])})")
    raw[section][name] = value
